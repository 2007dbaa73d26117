//! Runs the conformance suite against the backend named by `COMFYUME_TEST_STORE`
//! (`sqlite`, the default: a fresh file in a temporary directory per store).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use comfyume_store::conformance::Backend;
use comfyume_store::sqlite::SqliteStore;
use comfyume_store::{Store, conformance_tests};

#[derive(Default)]
struct SqliteFiles {
    dir: OnceLock<tempfile::TempDir>,
    open: Mutex<HashMap<String, Vec<SqliteStore>>>,
}

#[async_trait]
impl Backend for SqliteFiles {
    async fn create(&self) -> (Arc<dyn Store>, String) {
        let dir = self.dir.get_or_init(|| tempfile::tempdir().unwrap());
        let key = dir
            .path()
            .join(format!("{}.db", uuid::Uuid::new_v4()))
            .to_string_lossy()
            .into_owned();
        (self.open(&key).await, key)
    }

    async fn reopen(&self, key: &str) -> Arc<dyn Store> {
        let handles = self.open.lock().unwrap().remove(key).unwrap_or_default();
        for h in handles {
            h.close().await;
        }
        self.open(key).await
    }

    async fn open_another(&self, key: &str) -> Arc<dyn Store> {
        self.open(key).await
    }
}

impl SqliteFiles {
    async fn open(&self, key: &str) -> Arc<dyn Store> {
        let s = SqliteStore::open(std::path::Path::new(key)).await.unwrap();
        self.open
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default()
            .push(s.clone());
        Arc::new(s)
    }
}

fn backend() -> SqliteFiles {
    match std::env::var("COMFYUME_TEST_STORE").as_deref() {
        Ok("sqlite") | Err(_) => SqliteFiles::default(),
        Ok(other) => panic!("COMFYUME_TEST_STORE={other}: no such backend in this build"),
    }
}

conformance_tests!(backend());
