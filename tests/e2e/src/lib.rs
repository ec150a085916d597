//! The end-to-end suite lives in `tests/` (one test binary per file); see `klm-testkit` for the
//! cluster it runs against. `environment.rs` proves the harness is a real Kubernetes.
