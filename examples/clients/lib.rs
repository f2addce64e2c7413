//! Runnable examples that drive a real OCI client (oci-client): see the `[[example]]`
//! targets of this package (`cargo run -p registry-examples-clients --example
//! three_registries`). They live apart from `serve` (package `registry-examples`) so
//! that building `serve` never compiles oci-client and its TLS stack.
