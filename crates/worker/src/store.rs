//! The S3-compatible object store for outputs too large to send inline, and for input
//! files named by key. Files are streamed from and to disk: never held whole in memory.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::StoreSettings;

/// S3's smallest multipart part (except the last); files below it go in one PUT.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts uploaded at once: memory use is about this many parts.
const PARTS_IN_FLIGHT: usize = 2;
/// Read size from disk.
const READ_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store: {0}")]
    Store(String),
    #[error("local file: {0}")]
    Local(#[from] std::io::Error),
    #[error("object store: no answer within {0} s")]
    Timeout(u64),
    #[error("stored object {key} is larger than {limit} bytes")]
    TooLarge { key: String, limit: u64 },
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        // object_store's messages name the bucket and key, never credentials.
        StoreError::Store(e.to_string())
    }
}

/// One bucket of an S3-compatible store.
#[derive(Clone)]
pub struct OutputStore {
    inner: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    timeout: std::time::Duration,
}

impl std::fmt::Debug for OutputStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputStore")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl OutputStore {
    pub fn connect(s: &StoreSettings) -> Result<Self, StoreError> {
        // reqwest is built without a default crypto provider; https needs one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = AmazonS3Builder::new()
            .with_endpoint(s.endpoint.trim_end_matches('/'))
            .with_bucket_name(&s.bucket)
            .with_region(&s.region)
            .with_access_key_id(s.access_key_id.expose())
            .with_secret_access_key(s.secret_access_key.expose())
            // Path-style works with every S3-compatible server (R2, MinIO, moto).
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(s.timeout)
                    .with_connect_timeout(std::time::Duration::from_secs(10)),
            )
            // After the client options, which would reset it.
            .with_allow_http(s.endpoint.starts_with("http://"))
            .build()?;
        Ok(Self::with_store(
            Arc::new(store),
            &s.bucket,
            &s.prefix,
            s.timeout,
        ))
    }

    /// Any `ObjectStore` (the in-memory one in tests).
    pub fn with_store(
        inner: Arc<dyn ObjectStore>,
        bucket: &str,
        prefix: &str,
        timeout: std::time::Duration,
    ) -> Self {
        OutputStore {
            inner,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            timeout,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `<prefix><job id>/<file name>`.
    pub fn output_key(&self, job_id: &str, filename: &str) -> String {
        format!("{}{job_id}/{filename}", self.prefix)
    }

    /// Uploads `path` as `key`, reading it from disk piece by piece; returns its size and
    /// SHA-256 (hex).
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(u64, String), StoreError> {
        let secs = self.timeout.as_secs();
        tokio::time::timeout(self.timeout, self.put_file_inner(key, path))
            .await
            .map_err(|_| StoreError::Timeout(secs))?
    }

    async fn put_file_inner(&self, key: &str, path: &Path) -> Result<(u64, String), StoreError> {
        let location = ObjectPath::from(key);
        let mut file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let mut hash = Sha256::new();
        if len < PART_BYTES as u64 {
            let mut data = Vec::with_capacity(len as usize);
            file.read_to_end(&mut data).await?;
            hash.update(&data);
            let size = data.len() as u64;
            self.inner.put(&location, PutPayload::from(data)).await?;
            return Ok((size, hex::encode(hash.finalize())));
        }
        let upload = self.inner.put_multipart(&location).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; READ_BYTES];
        let mut size = 0u64;
        let res: Result<(), StoreError> = async {
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                hash.update(&buf[..n]);
                size += n as u64;
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match res {
            Ok(()) => {
                writer.finish().await?;
                Ok((size, hex::encode(hash.finalize())))
            }
            Err(e) => {
                // Do not leave parts behind (they are billed).
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Downloads `key` into `path` (created), refusing more than `limit` bytes.
    pub async fn get_file(&self, key: &str, path: &Path, limit: u64) -> Result<u64, StoreError> {
        let secs = self.timeout.as_secs();
        tokio::time::timeout(self.timeout, self.get_file_inner(key, path, limit))
            .await
            .map_err(|_| StoreError::Timeout(secs))?
    }

    async fn get_file_inner(&self, key: &str, path: &Path, limit: u64) -> Result<u64, StoreError> {
        let got = self.inner.get(&ObjectPath::from(key)).await?;
        if got.meta.size > limit {
            return Err(StoreError::TooLarge {
                key: key.to_owned(),
                limit,
            });
        }
        let mut out = tokio::fs::File::create(path).await?;
        let mut stream = got.into_stream();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(StoreError::TooLarge {
                    key: key.to_owned(),
                    limit,
                });
            }
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn files_round_trip_small_and_multipart() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutputStore::with_store(
            Arc::new(InMemory::new()),
            "b",
            "out/",
            std::time::Duration::from_secs(30),
        );
        for len in [0usize, 10, PART_BYTES + 12345] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let src = dir.path().join(format!("src{len}"));
            std::fs::write(&src, &data).unwrap();
            let key = store.output_key("job1", &format!("f{len}.bin"));
            let (size, sha) = store.put_file(&key, &src).await.unwrap();
            assert_eq!(size, len as u64);
            assert_eq!(sha, hex::encode(Sha256::digest(&data)));
            let back = dir.path().join(format!("back{len}"));
            assert_eq!(store.get_file(&key, &back, u64::MAX).await.unwrap(), size);
            assert_eq!(std::fs::read(&back).unwrap(), data);
        }
        let key = store.output_key("job1", "f10.bin");
        assert_eq!(key, "out/job1/f10.bin");
        let err = store
            .get_file(&key, &dir.path().join("x"), 5)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }));
        assert!(
            store
                .get_file("out/none", &dir.path().join("y"), 5)
                .await
                .is_err()
        );
    }
}
