//! Benchmarks: the criterion `[[bench]] core`, and the `load` binary that
//! `benches/compare.sh` runs against our server and CNCF Distribution
//! (see `benches/README.md`).
