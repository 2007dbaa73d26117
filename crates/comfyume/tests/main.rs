//! Every integration test of the `comfyume` binary, in one test binary: each module is one
//! area (its file beside this one), and test names read `area::test`. One binary, not one per
//! file, because each links the whole server: 26 of them took 1.9 GB of disk.

mod helpers;

#[path = "../../../tests/support/frontend.rs"]
mod frontend;
#[path = "../../../tests/support/workspace_bin.rs"]
mod workspace_bin;

mod admin;
mod auth;
mod banner;
mod browser;
mod cli;
mod connections;
mod crash;
mod csrf;
mod dashboard;
mod dispatch;
mod hostile;
mod isolation;
mod monitoring;
mod provision;
mod proxy_nginx;
mod public_origin;
mod queue;
mod routes;
mod security;
mod serverless;
mod sessions_end;
mod signin_throttle;
mod simulator;
mod traversal;
mod workspace;
mod ws_backpressure;
