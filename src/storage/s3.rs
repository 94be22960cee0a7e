//! The S3 backend (aws-sdk-s3): a repository at `s3://BUCKET/PREFIX`.
//!
//! Keys are `PREFIX/key`. Large objects stream as multipart uploads in parts of [`PART_SIZE`]
//! (never the whole object in memory); an unfinished upload is aborted. Reads are ranged.
//! Endpoint, region and credentials come from the standard AWS chain (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, env / profile / web identity / IMDS); addressing is path-style when the
//! endpoint is an IP address or localhost (local S3 servers), virtual-host otherwise.
//! Credentials never appear in errors: only the key, the operation and the service's code.

use async_trait::async_trait;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};

use super::{ObjectMeta, ObjectWriter, Storage, StorageError};

/// Multipart part size (S3's minimum is 5 MiB for all parts but the last).
pub const PART_SIZE: usize = 8 << 20;

#[derive(Clone, Debug)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    prefix: String,
}

/// Splits `s3://bucket/prefix` into bucket and prefix (without slashes at the ends).
pub fn parse_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// Whether an endpoint URL names a local server (an IP address or localhost): path-style.
fn wants_path_style(endpoint: &str) -> bool {
    let host = endpoint
        .split("://")
        .nth(1)
        .unwrap_or(endpoint)
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    host == "localhost" || host.parse::<std::net::Ipv4Addr>().is_ok() || endpoint.contains("://[")
}

fn remote<E, R>(key: &str, op: &str, e: SdkError<E, R>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let transient = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            matches!(
                code,
                "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout"
            )
        }
        _ => false,
    };
    let detail = match &e {
        SdkError::ServiceError(s) => format!(
            "{}: {}",
            s.err().code().unwrap_or("error"),
            s.err().message().unwrap_or("")
        ),
        other => aws_smithy_error(other).to_string(),
    };
    StorageError::Remote {
        key: key.to_string(),
        message: format!("{op}: {detail}"),
        transient,
    }
}

/// The kind of a non-service SDK error, without its debug payload (which may carry request
/// details).
fn aws_smithy_error<E, R>(e: &SdkError<E, R>) -> &'static str {
    match e {
        SdkError::ConstructionFailure(_) => "the request could not be built",
        SdkError::TimeoutError(_) => "timed out",
        SdkError::DispatchFailure(_) => "could not reach the S3 endpoint",
        SdkError::ResponseError(_) => "unreadable response",
        _ => "error",
    }
}

impl S3Storage {
    /// Connects to `s3://bucket/prefix` with the standard AWS configuration chain.
    pub async fn new(url: &str) -> Result<Self, StorageError> {
        let (bucket, prefix) =
            parse_url(url).ok_or_else(|| StorageError::InvalidKey(url.into()))?;
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared);
        if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL") {
            conf = conf
                .endpoint_url(&ep)
                .force_path_style(wants_path_style(&ep));
        }
        Ok(S3Storage {
            client: Client::from_conf(conf.build()),
            bucket,
            prefix,
        })
    }

    /// With an explicitly configured client (tests, tools).
    pub fn with_client(client: Client, url: &str) -> Result<Self, StorageError> {
        let (bucket, prefix) =
            parse_url(url).ok_or_else(|| StorageError::InvalidKey(url.into()))?;
        Ok(S3Storage {
            client,
            bucket,
            prefix,
        })
    }

    fn full(&self, key: &str) -> Result<String, StorageError> {
        super::validate_key(key)?;
        Ok(if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }
}

impl S3Storage {
    /// GET of a whole object or a `Range`; one request, no size lookup first.
    async fn read(&self, key: &str, range: Option<String>) -> Result<Bytes, StorageError> {
        let full = self.full(key)?;
        let ranged = range.is_some();
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .set_range(range)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                return match e.as_service_error() {
                    Some(s) if s.is_no_such_key() => Err(StorageError::NotFound(key.to_string())),
                    Some(s) if ranged && s.code() == Some("InvalidRange") => Ok(Bytes::new()),
                    _ => Err(remote(key, "reading", e)),
                }
            }
        };
        let body = out.body.collect().await.map_err(|e| StorageError::Remote {
            key: key.to_string(),
            message: format!("reading the body: {e}"),
            transient: true,
        })?;
        Ok(body.into_bytes())
    }
}

struct S3Writer {
    s: S3Storage,
    key: String,
    full: String,
    buf: BytesMut,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    size: u64,
}

impl S3Writer {
    async fn upload_part(&mut self, data: Bytes) -> Result<(), StorageError> {
        let id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let out = self
                    .s
                    .client
                    .create_multipart_upload()
                    .bucket(&self.s.bucket)
                    .key(&self.full)
                    .send()
                    .await
                    .map_err(|e| remote(&self.key, "starting a multipart upload", e))?;
                let id = out.upload_id().unwrap_or_default().to_string();
                self.upload_id = Some(id.clone());
                id
            }
        };
        let n = self.parts.len() as i32 + 1;
        let out = self
            .s
            .client
            .upload_part()
            .bucket(&self.s.bucket)
            .key(&self.full)
            .upload_id(&id)
            .part_number(n)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| remote(&self.key, "uploading a part", e))?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(n)
                .set_e_tag(out.e_tag().map(str::to_string))
                .build(),
        );
        Ok(())
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        self.size += data.len() as u64;
        self.buf.extend_from_slice(&data);
        while self.buf.len() >= PART_SIZE {
            let part = self.buf.split_to(PART_SIZE).freeze();
            self.upload_part(part).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StorageError> {
        let rest = std::mem::take(&mut self.buf).freeze();
        if self.upload_id.is_none() {
            self.s.put(&self.key, rest).await?;
            return Ok(self.size);
        }
        if !rest.is_empty() {
            self.upload_part(rest).await?;
        }
        let id = self.upload_id.take().expect("multipart started");
        let parts = std::mem::take(&mut self.parts);
        let r = self
            .s
            .client
            .complete_multipart_upload()
            .bucket(&self.s.bucket)
            .key(&self.full)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        if let Err(e) = r {
            self.upload_id = Some(id);
            let err = remote(&self.key, "completing a multipart upload", e);
            self.abort_upload().await;
            return Err(err);
        }
        Ok(self.size)
    }

    async fn abort(mut self: Box<Self>) {
        self.abort_upload().await;
    }
}

impl S3Writer {
    async fn abort_upload(&mut self) {
        if let Some(id) = self.upload_id.take() {
            let _ = self
                .s
                .client
                .abort_multipart_upload()
                .bucket(&self.s.bucket)
                .key(&self.full)
                .upload_id(id)
                .send()
                .await;
        }
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // An unfinished multipart upload costs storage until aborted: abort it in the
        // background (best effort; bucket lifecycle rules catch the rest).
        if let Some(id) = self.upload_id.take() {
            let (client, bucket, key) = (
                self.s.client.clone(),
                self.s.bucket.clone(),
                self.full.clone(),
            );
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = client
                        .abort_multipart_upload()
                        .bucket(bucket)
                        .key(key)
                        .upload_id(id)
                        .send()
                        .await;
                });
            }
        }
    }
}

#[async_trait]
impl Storage for S3Storage {
    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let full = self.full(key)?;
        Ok(Box::new(S3Writer {
            s: self.clone(),
            key: key.to_string(),
            full,
            buf: BytesMut::new(),
            upload_id: None,
            parts: Vec::new(),
            size: 0,
        }))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let full = self.full(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| remote(key, "writing", e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.read(key, None).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StorageError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        // S3 clamps the range's end to the object; a start past the end is `InvalidRange`.
        self.read(key, Some(format!("bytes={offset}-{}", offset + len - 1)))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let full = self.full(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0) as u64,
                modified: out
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
            })),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(remote(key, "looking up", e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let full_prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| remote(prefix, "listing", e))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                out.push(ObjectMeta {
                    key: k[strip..].to_string(),
                    size: o.size().unwrap_or(0) as u64,
                    modified: o
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let full = self.full(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| remote(key, "deleting", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_addressing() {
        assert_eq!(parse_url("s3://b/p/q/"), Some(("b".into(), "p/q".into())));
        assert_eq!(parse_url("s3://b"), Some(("b".into(), String::new())));
        assert_eq!(parse_url("s3:///x"), None);
        assert_eq!(parse_url("/local"), None);
        assert!(wants_path_style("http://127.0.0.1:9000"));
        assert!(wants_path_style("http://localhost:4566/"));
        assert!(!wants_path_style("https://s3.eu-west-1.amazonaws.com"));
    }
}
