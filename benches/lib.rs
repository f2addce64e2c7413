//! Benchmarks: see the `[[bench]]` targets of this package.
