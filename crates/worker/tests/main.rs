//! The worker agent's integration tests in one test binary: each module is one area (its
//! file beside this one). One binary, not one per file, because each links the whole agent.

mod helpers;
#[path = "../../../tests/support/workspace_bin.rs"]
mod workspace_bin;

mod process;
mod store;
mod worker;
