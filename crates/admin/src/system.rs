//! The System view: disk use per area of the data directory and of its file system
//! (read off the runtime's threads, every 30 s while a dashboard is open).

use std::collections::HashMap;
use std::path::Path;

use axum::Extension;
use axum::Json;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::{Admin, Instructor, unavailable};

/// Bytes used per area, and the file system's size and free space.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Areas {
    pub outputs: u64,
    pub inputs: u64,
    pub user_data: u64,
    pub temp: u64,
    /// comfyume.db with its WAL.
    pub database: u64,
    pub frontend: u64,
    pub filesystem_total: Option<u64>,
    pub filesystem_free: Option<u64>,
}

pub struct Scan {
    pub areas: Areas,
    /// Bytes per participant: outputs, inputs and user data.
    pub per_user: HashMap<String, u64>,
}

/// Sum of file sizes under `dir` (links not followed); 0 when it does not exist.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

/// Sizes of each child folder of `dir`, by name.
fn per_child(dir: &Path, into: &mut HashMap<String, u64>) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let n = dir_size(&e.path());
            *into
                .entry(e.file_name().to_string_lossy().into_owned())
                .or_default() += n;
            total += n;
        }
    }
    total
}

/// Walks the data directory (blocking).
pub fn scan(data_dir: &Path, frontend_dir: &Path) -> Scan {
    let mut per_user = HashMap::new();
    let outputs = per_child(&data_dir.join("outputs"), &mut per_user);
    let inputs = per_child(&data_dir.join("inputs"), &mut per_user);
    let user_data = per_child(&data_dir.join("user_data"), &mut per_user);
    let file = |name: &str| {
        std::fs::metadata(data_dir.join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let database = file("comfyume.db") + file("comfyume.db-wal") + file("comfyume.db-shm");
    let fs = rustix::fs::statvfs(data_dir).ok();
    Scan {
        areas: Areas {
            outputs,
            inputs,
            user_data,
            temp: dir_size(&data_dir.join("temp")),
            database,
            frontend: dir_size(frontend_dir),
            filesystem_total: fs.as_ref().map(|s| s.f_blocks * s.f_frsize),
            filesystem_free: fs.as_ref().map(|s| s.f_bavail * s.f_frsize),
        },
        per_user,
    }
}

/// `GET /admin/api/system`.
pub async fn get(Extension(admin): Extension<Admin>, _: Instructor) -> Response {
    match admin.dashboard.system_section().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_counts_each_area_and_participant() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("outputs/user001/video")).unwrap();
        std::fs::write(d.join("outputs/user001/a.png"), [0u8; 100]).unwrap();
        std::fs::write(d.join("outputs/user001/video/b.mp4"), [0u8; 50]).unwrap();
        std::fs::create_dir_all(d.join("inputs/user002")).unwrap();
        std::fs::write(d.join("inputs/user002/c.png"), [0u8; 7]).unwrap();
        std::fs::write(d.join("comfyume.db"), [0u8; 10]).unwrap();
        let s = scan(d, &d.join("frontend"));
        assert_eq!(s.areas.outputs, 150);
        assert_eq!(s.areas.inputs, 7);
        assert_eq!(s.areas.database, 10);
        assert_eq!(s.per_user["user001"], 150);
        assert_eq!(s.per_user["user002"], 7);
        assert!(s.areas.filesystem_total.unwrap() > 0);
    }
}
