//! Runnable examples: see the `[[example]]` targets of this package (`serve`). The
//! examples that drive a real OCI client are in `examples/clients` (package
//! `registry-examples-clients`), so that `serve` builds without their dependencies.
