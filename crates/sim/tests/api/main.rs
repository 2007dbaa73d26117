//! Integration tests: the simulator on 127.0.0.1:0, driven like a ComfyUI client would.

mod faults;
mod files;
mod frontend;
mod helpers;
mod jobs;
mod protocol;
mod templates;
mod workflows;
