//! Output files as a worker delivers them: inline chunks written to disk as they come,
//! or a key in the S3-compatible store fetched as a stream; either way checked (size,
//! SHA-256) and only then given a name in the participant's folder.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use comfyume_comfyui::outputs::NewOutput;
use comfyume_wire::worker::{FileRef, StoreRef};
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::config::StoreConfig;

/// Largest single output accepted (a hostile or broken worker cannot fill the disk).
pub const MAX_OUTPUT_BYTES: u64 = 16 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FileError {
    /// The worker broke the protocol (wrong order, size or digest).
    #[error("{0}")]
    Protocol(String),
    /// The object store could not be reached or answered wrongly.
    #[error("{0}")]
    Local(String),
    /// Our own disk could not take it (full, ...): not worth another GPU.
    #[error("{0}")]
    Disk(String),
}

/// An inline file being received.
pub struct Incoming {
    pub file: FileRef,
    out: NewOutput,
    size: u64,
    next_index: u64,
    written: u64,
    hash: Sha256,
}

impl Incoming {
    pub async fn start(file: FileRef, size: u64, dir: &std::path::Path) -> Result<Self, FileError> {
        if size > MAX_OUTPUT_BYTES {
            return Err(FileError::Protocol(format!(
                "output {} announces {size} bytes, more than the {MAX_OUTPUT_BYTES}-byte limit",
                file.filename
            )));
        }
        let out = NewOutput::create(dir)
            .await
            .map_err(|e| FileError::Disk(format!("cannot save output {}: {e}", file.filename)))?;
        Ok(Incoming {
            file,
            out,
            size,
            next_index: 0,
            written: 0,
            hash: Sha256::new(),
        })
    }

    pub async fn chunk(&mut self, file: &FileRef, index: u64, data: &str) -> Result<(), FileError> {
        if *file != self.file || index != self.next_index {
            return Err(FileError::Protocol(format!(
                "output chunk {index} of {} out of order",
                file.filename
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|_| FileError::Protocol(format!("output chunk {index} is not base64")))?;
        self.written += bytes.len() as u64;
        if self.written > self.size {
            return Err(FileError::Protocol(format!(
                "output {} is larger than the {} bytes announced",
                self.file.filename, self.size
            )));
        }
        self.hash.update(&bytes);
        self.out.write(&bytes).await.map_err(|e| {
            FileError::Disk(format!("cannot save output {}: {e}", self.file.filename))
        })?;
        self.next_index += 1;
        Ok(())
    }

    /// Checks size and digest, then publishes; returns the local name.
    pub async fn finish(
        self,
        file: &FileRef,
        size: u64,
        sha256: &str,
        job_id: &str,
    ) -> Result<String, FileError> {
        if *file != self.file {
            return Err(FileError::Protocol(format!(
                "output_end for {} while {} was being sent",
                file.filename, self.file.filename
            )));
        }
        let got = hex::encode(self.hash.finalize());
        if size != self.written || size != self.size || !got.eq_ignore_ascii_case(sha256) {
            return Err(FileError::Protocol(format!(
                "output {} arrived damaged ({} of {size} bytes, digest {})",
                self.file.filename,
                self.written,
                if got.eq_ignore_ascii_case(sha256) {
                    "ok"
                } else {
                    "wrong"
                }
            )));
        }
        self.out
            .publish(&self.file.filename, job_id)
            .await
            .map_err(|e| FileError::Disk(format!("cannot save output {}: {e}", file.filename)))
    }
}

/// Our read access to the bucket the workers put large outputs in.
#[derive(Clone)]
pub struct ObjectFetcher {
    inner: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    timeout: Duration,
}

impl ObjectFetcher {
    pub fn connect(s: &StoreConfig) -> Result<Self, FileError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = AmazonS3Builder::new()
            .with_endpoint(s.endpoint.trim_end_matches('/'))
            .with_bucket_name(&s.bucket)
            .with_region(&s.region)
            .with_access_key_id(s.access_key_id.expose())
            .with_secret_access_key(s.secret_access_key.expose())
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(s.timeout)
                    .with_connect_timeout(Duration::from_secs(10)),
            )
            .with_allow_http(s.endpoint.starts_with("http://"))
            .build()
            .map_err(|e| FileError::Local(format!("output store: {e}")))?;
        Ok(ObjectFetcher {
            inner: Arc::new(store),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            timeout: s.timeout,
        })
    }

    /// Any store (tests).
    pub fn with_store(inner: Arc<dyn ObjectStore>, bucket: &str, prefix: &str) -> Self {
        ObjectFetcher {
            inner,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(600),
        }
    }

    /// Where a job's input goes when it is too large to send inline.
    pub fn input_key(&self, job_id: &str, name: &str) -> String {
        format!("{}inputs/{job_id}/{name}", self.prefix)
    }

    /// Uploads a local file as `key`, read from disk piece by piece (multipart above
    /// S3's smallest part): never whole in memory.
    pub async fn put_file(&self, key: &str, path: &std::path::Path) -> Result<u64, FileError> {
        let secs = self.timeout.as_secs();
        tokio::time::timeout(self.timeout, self.put_inner(key, path))
            .await
            .map_err(|_| FileError::Local(format!("output store: no answer within {secs} s")))?
    }

    async fn put_inner(&self, key: &str, path: &std::path::Path) -> Result<u64, FileError> {
        const PART: usize = 8 * 1024 * 1024;
        let local = |e: String| FileError::Local(format!("input {key}: {e}"));
        let location = ObjectPath::from(key);
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| local(e.to_string()))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| local(e.to_string()))?
            .len();
        if len < PART as u64 {
            let mut data = Vec::with_capacity(len as usize);
            file.read_to_end(&mut data)
                .await
                .map_err(|e| local(e.to_string()))?;
            self.inner
                .put(&location, PutPayload::from(data))
                .await
                .map_err(|e| local(e.to_string()))?;
            return Ok(len);
        }
        let upload = self
            .inner
            .put_multipart(&location)
            .await
            .map_err(|e| local(e.to_string()))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        let res: Result<(), FileError> = async {
            loop {
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| local(e.to_string()))?;
                if n == 0 {
                    return Ok(());
                }
                size += n as u64;
                writer
                    .wait_for_capacity(2)
                    .await
                    .map_err(|e| local(e.to_string()))?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match res {
            Ok(()) => {
                writer.finish().await.map_err(|e| local(e.to_string()))?;
                Ok(size)
            }
            Err(e) => {
                // Parts left behind are billed.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Only keys the worker may have written for this job: our bucket, under
    /// `<prefix><job id>/` (a worker cannot make us fetch another job's file).
    pub fn check(&self, store: &StoreRef, job_id: &str) -> Result<(), FileError> {
        let expected = format!("{}{job_id}/", self.prefix);
        if store.bucket != self.bucket
            || !store.key.starts_with(&expected)
            || store.key.contains("/../")
            || store.key.len() <= expected.len()
        {
            return Err(FileError::Protocol(format!(
                "output stored at {}/{}, outside {}/{expected}",
                store.bucket, store.key, self.bucket
            )));
        }
        Ok(())
    }

    /// Streams the object into the participant's folder, checking size and digest.
    pub async fn fetch(
        &self,
        file: &FileRef,
        store: &StoreRef,
        size: u64,
        sha256: &str,
        dir: &std::path::Path,
        job_id: &str,
    ) -> Result<String, FileError> {
        self.check(store, job_id)?;
        if size > MAX_OUTPUT_BYTES {
            return Err(FileError::Protocol(format!(
                "output {} announces {size} bytes, more than the limit",
                file.filename
            )));
        }
        let secs = self.timeout.as_secs();
        tokio::time::timeout(
            self.timeout,
            self.fetch_inner(file, store, size, sha256, dir, job_id),
        )
        .await
        .map_err(|_| {
            FileError::Local(format!(
                "output store: {} not fetched within {secs} s",
                file.filename
            ))
        })?
    }

    async fn fetch_inner(
        &self,
        file: &FileRef,
        store: &StoreRef,
        size: u64,
        sha256: &str,
        dir: &std::path::Path,
        job_id: &str,
    ) -> Result<String, FileError> {
        let local = |e: String| FileError::Local(format!("output store: {e}"));
        let got = self
            .inner
            .get(&ObjectPath::from(store.key.as_str()))
            .await
            .map_err(|e| local(e.to_string()))?;
        if got.meta.size != size {
            return Err(FileError::Protocol(format!(
                "stored output {} has {} bytes, {size} announced",
                file.filename, got.meta.size
            )));
        }
        let mut out = NewOutput::create(dir)
            .await
            .map_err(|e| FileError::Disk(format!("cannot save output {}: {e}", file.filename)))?;
        let mut hash = Sha256::new();
        let mut written = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| local(e.to_string()))?;
            written += chunk.len() as u64;
            if written > size {
                return Err(FileError::Protocol(format!(
                    "stored output {} is larger than announced",
                    file.filename
                )));
            }
            hash.update(&chunk);
            out.write(&chunk).await.map_err(|e| {
                FileError::Disk(format!("cannot save output {}: {e}", file.filename))
            })?;
        }
        let digest = hex::encode(hash.finalize());
        if written != size || !digest.eq_ignore_ascii_case(sha256) {
            return Err(FileError::Protocol(format!(
                "stored output {} arrived damaged",
                file.filename
            )));
        }
        out.publish(&file.filename, job_id)
            .await
            .map_err(|e| FileError::Disk(format!("cannot save output {}: {e}", file.filename)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn fref(name: &str) -> FileRef {
        FileRef {
            filename: name.into(),
            subfolder: String::new(),
            kind: "output".into(),
        }
    }

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[tokio::test]
    async fn inline_files_are_checked_before_they_get_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"hello world";
        let sha = hex::encode(Sha256::digest(data));
        let f = fref("../a.png");
        let mut inc = Incoming::start(f.clone(), 11, dir.path()).await.unwrap();
        inc.chunk(&f, 0, &b64(&data[..5])).await.unwrap();
        inc.chunk(&f, 1, &b64(&data[5..])).await.unwrap();
        let name = inc.finish(&f, 11, &sha, "job1").await.unwrap();
        assert_eq!(name, "a.png");
        assert_eq!(std::fs::read(dir.path().join("a.png")).unwrap(), data);

        // Out of order, too long, wrong digest, not base64: refused, nothing left behind.
        {
            let mut inc = Incoming::start(f.clone(), 11, dir.path()).await.unwrap();
            assert!(inc.chunk(&f, 1, &b64(data)).await.is_err());
        }
        {
            let mut inc = Incoming::start(f.clone(), 3, dir.path()).await.unwrap();
            assert!(inc.chunk(&f, 0, &b64(data)).await.is_err());
        }
        let mut inc = Incoming::start(f.clone(), 11, dir.path()).await.unwrap();
        assert!(inc.chunk(&f, 0, "***").await.is_err());
        inc.chunk(&f, 0, &b64(data)).await.unwrap();
        assert!(inc.finish(&f, 11, &"0".repeat(64), "job1").await.is_err());
        let mut inc = Incoming::start(f.clone(), 11, dir.path()).await.unwrap();
        inc.chunk(&f, 0, &b64(&data[..4])).await.unwrap();
        assert!(inc.finish(&f, 11, &sha, "job1").await.is_err());
        assert!(
            Incoming::start(f.clone(), MAX_OUTPUT_BYTES + 1, dir.path())
                .await
                .is_err()
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["a.png"]);
    }

    #[tokio::test]
    async fn inputs_go_up_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(InMemory::new());
        let f = ObjectFetcher::with_store(mem.clone(), "bucket", "outputs/");
        for len in [10usize, 8 * 1024 * 1024 + 77] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let src = dir.path().join("in.bin");
            std::fs::write(&src, &data).unwrap();
            let key = f.input_key("job1", "clips/in.bin");
            assert_eq!(key, "outputs/inputs/job1/clips/in.bin");
            assert_eq!(f.put_file(&key, &src).await.unwrap(), len as u64);
            let back = mem.get(&ObjectPath::from(key.as_str())).await.unwrap();
            assert_eq!(back.bytes().await.unwrap().as_ref(), &data[..]);
        }
    }

    #[tokio::test]
    async fn stored_files_only_from_this_jobs_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(InMemory::new());
        let data = vec![7u8; 100_000];
        mem.put(
            &ObjectPath::from("outputs/job1/v.mp4"),
            PutPayload::from(data.clone()),
        )
        .await
        .unwrap();
        let f = ObjectFetcher::with_store(mem, "bucket", "outputs/");
        let sha = hex::encode(Sha256::digest(&data));
        let at = |bucket: &str, key: &str| StoreRef {
            bucket: bucket.into(),
            key: key.into(),
        };
        let name = f
            .fetch(
                &fref("v.mp4"),
                &at("bucket", "outputs/job1/v.mp4"),
                100_000,
                &sha,
                dir.path(),
                "job1",
            )
            .await
            .unwrap();
        assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), data);
        for (b, k) in [
            ("other", "outputs/job1/v.mp4"),
            ("bucket", "outputs/job2/v.mp4"),
            ("bucket", "outputs/job1/"),
            ("bucket", "secrets/x"),
        ] {
            assert!(f.check(&at(b, k), "job1").is_err(), "{b}/{k}");
        }
        // Wrong size or digest: refused.
        assert!(
            f.fetch(
                &fref("v.mp4"),
                &at("bucket", "outputs/job1/v.mp4"),
                99,
                &sha,
                dir.path(),
                "job1"
            )
            .await
            .is_err()
        );
        assert!(
            f.fetch(
                &fref("v.mp4"),
                &at("bucket", "outputs/job1/v.mp4"),
                100_000,
                &"0".repeat(64),
                dir.path(),
                "job1"
            )
            .await
            .is_err()
        );
    }
}
