//! The S3 backend (aws-sdk-s3): a repository at `s3://BUCKET/PREFIX`.
//!
//! Keys are `PREFIX/key`. Large objects stream as multipart uploads in parts of [`PART_SIZE`]
//! (never the whole object in memory); an unfinished upload is aborted. Reads are ranged.
//! Endpoint, region and credentials come from the standard AWS chain (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, env / profile / web identity / IMDS); addressing is path-style when the
//! endpoint is an IP address or localhost (local S3 servers), virtual-host otherwise.
//! Credentials never appear in errors: only the key, the operation and the service's code.
//!
//! Immutable objects are written with `If-None-Match: *` ([`WriteMode::CreateNew`]), on
//! `PutObject` and on `CompleteMultipartUpload`, so S3 itself refuses to replace them. Each
//! multipart part is retried on its own (the one retry helper); whole operations are retried by
//! [`super::retrying::Retrying`]. Storage class, SSE-S3 / SSE-KMS and Object Lock retention are
//! applied to every object written ([`S3Options`]).

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockMode,
    ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use super::{ObjectMeta, ObjectWriter, Storage, StorageError, WriteMode};
use crate::retry::{retry, RetryPolicy};

/// Multipart part size (S3's minimum is 5 MiB for all parts but the last).
pub const PART_SIZE: usize = 8 << 20;
/// Multipart parts uploading at once, over all objects written through one bucket
/// configuration, by default: the upload memory is bounded by this many parts (64 MiB) however
/// many objects upload concurrently.
pub const PARTS_IN_FLIGHT: usize = 8;

/// How objects are written to a bucket (the tier's section of the configuration file).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    /// Endpoint URL (else `AWS_ENDPOINT_URL`, else AWS's).
    pub endpoint: Option<String>,
    /// Region (else the AWS chain's: `AWS_REGION`, profile).
    pub region: Option<String>,
    /// Path-style addressing (default: automatic — on for IP/localhost endpoints).
    pub path_style: Option<bool>,
    /// e.g. `STANDARD_IA`, `GLACIER_IR` (default: the bucket's, STANDARD).
    pub storage_class: Option<String>,
    /// Server-side encryption: `AES256` (SSE-S3) or `aws:kms` (SSE-KMS).
    pub sse: Option<String>,
    /// The KMS key for `sse = "aws:kms"` (default: the account's aws/s3 key).
    pub sse_kms_key_id: Option<String>,
    /// Object Lock retention for every object written: `GOVERNANCE` or `COMPLIANCE`.
    pub object_lock_mode: Option<String>,
    /// Object Lock retention period, in days (with `object_lock_mode`).
    pub object_lock_days: Option<u32>,
    /// Multipart parts uploading at once, all objects together (default [`PARTS_IN_FLIGHT`];
    /// the upload memory: this many 8 MiB parts).
    pub part_concurrency: Option<usize>,
    /// Sign each upload's body as well as its headers (SigV4's payload hash, a SHA-256 of the
    /// body computed before the request goes out). Default off, as the AWS SDKs do over TLS:
    /// every part and object carries its CRC-32 in a signed header and the store checks the
    /// body against it, TLS covers transit, and archiver checks its own SHA-256 of every
    /// object on every read. On where a bucket policy demands signed payloads (the condition
    /// key `s3:x-amz-content-sha256`).
    pub sign_payload: Option<bool>,
}

impl S3Options {
    /// Refuses settings S3 would reject later, at start (clear errors, nothing written).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.storage_class {
            if !StorageClass::values().contains(&c.as_str()) {
                return Err(format!("unknown S3 storage class {c:?}"));
            }
        }
        match self.sse.as_deref() {
            None | Some("AES256") | Some("aws:kms") => {}
            Some(o) => return Err(format!("unknown sse {o:?}: use \"AES256\" or \"aws:kms\"")),
        }
        if self.part_concurrency.is_some_and(|n| n == 0 || n > 32) {
            return Err("part_concurrency must be between 1 and 32".into());
        }
        if self.sse_kms_key_id.is_some() && self.sse.as_deref() != Some("aws:kms") {
            return Err("sse_kms_key_id needs sse = \"aws:kms\"".into());
        }
        match (&self.object_lock_mode, self.object_lock_days) {
            (None, None) => {}
            (Some(m), Some(d)) if (m == "GOVERNANCE" || m == "COMPLIANCE") && d > 0 => {}
            (Some(m), Some(_)) if m != "GOVERNANCE" && m != "COMPLIANCE" => {
                return Err(format!(
                    "unknown object_lock_mode {m:?}: use \"GOVERNANCE\" or \"COMPLIANCE\""
                ))
            }
            _ => {
                return Err(
                    "object lock needs both object_lock_mode and object_lock_days (> 0)".into(),
                )
            }
        }
        Ok(())
    }

    /// The retain-until date for an object written now.
    fn retain_until(&self) -> Option<aws_sdk_s3::primitives::DateTime> {
        let days = self.object_lock_days?;
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(days as u64 * 86_400);
        Some(aws_sdk_s3::primitives::DateTime::from(t))
    }
}

#[derive(Clone, Debug)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    prefix: String,
    opts: S3Options,
    /// Per-part retries inside multipart uploads.
    retry: RetryPolicy,
    /// Parts in flight, shared by every writer of this store.
    parts: std::sync::Arc<tokio::sync::Semaphore>,
}

impl S3Storage {
    /// Under Object Lock, deleting removes the object's versions themselves (a plain delete
    /// would only hide them behind a delete marker while they stay, locked, in the bucket). A
    /// version still under retention is refused by S3: that refusal is the error, so the
    /// caller can report it and try again once the retention has passed.
    async fn delete_versions(&self, key: &str, full: &str) -> Result<(), StorageError> {
        let listed = self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(full)
            .send()
            .await
            .map_err(|e| remote(key, "listing the versions of", e))?;
        let versions = listed
            .versions()
            .iter()
            .filter(|v| v.key() == Some(full))
            .filter_map(|v| v.version_id())
            .chain(
                listed
                    .delete_markers()
                    .iter()
                    .filter(|m| m.key() == Some(full))
                    .filter_map(|m| m.version_id()),
            );
        for version in versions {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(full)
                .version_id(version)
                .send()
                .await
                .map_err(|e| remote(key, "deleting a version of", e))?;
        }
        Ok(())
    }
}

/// Applies the write options to a `PutObject` or `CreateMultipartUpload` builder (same setters).
macro_rules! with_write_options {
    ($b:expr, $o:expr) => {{
        let o: &S3Options = $o;
        let mut b = $b;
        if let Some(c) = &o.storage_class {
            b = b.storage_class(StorageClass::from(c.as_str()));
        }
        if let Some(sse) = &o.sse {
            b = b.server_side_encryption(ServerSideEncryption::from(sse.as_str()));
        }
        if let Some(k) = &o.sse_kms_key_id {
            b = b.ssekms_key_id(k);
        }
        if let (Some(m), Some(until)) = (&o.object_lock_mode, o.retain_until()) {
            b = b
                .object_lock_mode(ObjectLockMode::from(m.as_str()))
                .object_lock_retain_until_date(until);
        }
        b
    }};
}

/// An upload's body is signed only when [`S3Options::sign_payload`] says so: the SHA-256 of
/// an 8 MiB part, computed before the request can start, cost 9% of the upload's throughput
/// against the local S3 server (docs/benchmarks.md).
trait PayloadSigning: Sized {
    fn unsigned_unless(self, sign: Option<bool>) -> Self;
}

macro_rules! payload_signing {
    ($($output:ty),*) => {$(
        impl<E, B> PayloadSigning
            for aws_sdk_s3::client::customize::CustomizableOperation<$output, E, B>
        {
            fn unsigned_unless(self, sign: Option<bool>) -> Self {
                if sign.unwrap_or(false) {
                    self
                } else {
                    self.disable_payload_signing()
                }
            }
        }
    )*};
}

payload_signing!(
    aws_sdk_s3::operation::put_object::PutObjectOutput,
    aws_sdk_s3::operation::upload_part::UploadPartOutput
);

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

fn remote<E>(key: &str, op: &str, e: SdkError<E, HttpResponse>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(s) = &e {
        if s.err().code() == Some("PreconditionFailed") {
            return StorageError::AlreadyExists(key.to_string());
        }
    }
    let transient = match &e {
        SdkError::DispatchFailure(d) => !d.is_user(),
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            let status = s.raw().status().as_u16();
            matches!(
                code,
                "SlowDown"
                    | "InternalError"
                    | "ServiceUnavailable"
                    | "RequestTimeout"
                    | "ConditionalRequestConflict"
                    | "OperationAborted"
            ) || status >= 500
                || status == 429
        }
        _ => false,
    };
    let detail = match &e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("error");
            let hint = match code {
                "NoSuchBucket" => " (the bucket does not exist; create it first)",
                "AccessDenied" => " (the credentials lack permission for this operation)",
                "InvalidAccessKeyId" | "SignatureDoesNotMatch" => {
                    " (the AWS credentials are not valid for this endpoint)"
                }
                c if c.starts_with("KMS") => {
                    " (the KMS key cannot be used: check sse_kms_key_id and its key policy)"
                }
                _ => "",
            };
            format!("{code}: {}{hint}", s.err().message().unwrap_or(""))
        }
        SdkError::DispatchFailure(d) if d.is_user() => {
            "the request could not be sent (no usable AWS credentials or configuration?)".into()
        }
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
        Self::with_options(url, S3Options::default()).await
    }

    /// Connects to `s3://bucket/prefix` with the standard AWS configuration chain, overridden
    /// by `opts` (endpoint, region, addressing) and writing objects as `opts` says.
    pub async fn with_options(url: &str, opts: S3Options) -> Result<Self, StorageError> {
        let (bucket, prefix) = Self::check(url, &opts)?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &opts.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared);
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(ep) = &endpoint {
            conf = conf.endpoint_url(ep);
        }
        let path_style = opts
            .path_style
            .unwrap_or_else(|| endpoint.as_deref().is_some_and(wants_path_style));
        conf = conf.force_path_style(path_style);
        // One retry helper: the SDK's own retries are off, so every retry is ours (backoff
        // with jitter, logged) — per multipart part here, per operation in `Retrying`. A hung
        // connection counts as a transient failure after the attempt timeout.
        conf = conf
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .operation_attempt_timeout(std::time::Duration::from_secs(300))
                    .build(),
            );
        Ok(Self::assemble(
            Client::from_conf(conf.build()),
            bucket,
            prefix,
            opts,
        ))
    }

    /// With an explicitly configured client (tests, tools).
    pub fn with_client(client: Client, url: &str) -> Result<Self, StorageError> {
        Self::with_client_options(client, url, S3Options::default())
    }

    /// [`S3Storage::with_client`]'s storage with `opts` in place of the defaults (the client's
    /// own settings — endpoint, region, path style — stay the client's).
    pub fn with_client_options(
        client: Client,
        url: &str,
        opts: S3Options,
    ) -> Result<Self, StorageError> {
        let (bucket, prefix) = Self::check(url, &opts)?;
        Ok(Self::assemble(client, bucket, prefix, opts))
    }

    /// Refuses a malformed URL or options S3 would reject later (nothing is contacted);
    /// returns the URL's bucket and prefix.
    fn check(url: &str, opts: &S3Options) -> Result<(String, String), StorageError> {
        let parsed = parse_url(url).ok_or_else(|| StorageError::InvalidKey(url.into()))?;
        opts.validate().map_err(|message| StorageError::Remote {
            key: url.to_string(),
            message,
            transient: false,
        })?;
        Ok(parsed)
    }

    /// The storage over `client`, for a bucket, prefix and options [`S3Storage::check`] passed.
    fn assemble(client: Client, bucket: String, prefix: String, opts: S3Options) -> Self {
        S3Storage {
            client,
            bucket,
            prefix,
            parts: std::sync::Arc::new(tokio::sync::Semaphore::new(
                opts.part_concurrency.unwrap_or(PARTS_IN_FLIGHT),
            )),
            opts,
            retry: RetryPolicy::default(),
        }
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Fails at once, with S3's own reason, if the bucket cannot be reached or listed (missing
    /// bucket, bad credentials, no permission).
    pub async fn check_access(&self) -> Result<(), StorageError> {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| remote(&format!("s3://{}", self.bucket), "listing the bucket", e))?;
        Ok(())
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
    /// Parts being uploaded.
    in_flight: tokio::task::JoinSet<Result<CompletedPart, StorageError>>,
    next_part: i32,
    size: u64,
    mode: WriteMode,
}

impl S3Writer {
    async fn upload_part(&mut self, data: Bytes) -> Result<(), StorageError> {
        let id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let out = retry(&self.s.retry, "starting a multipart upload", || async {
                    with_write_options!(
                        self.s
                            .client
                            .create_multipart_upload()
                            .bucket(&self.s.bucket)
                            .key(&self.full)
                            // Every part carries its CRC-32 and the completion lists them: the
                            // store checks each part and the whole object against them (what
                            // boto3's `upload_file` declares too). Measured against the local
                            // S3 server: 1.2x the throughput of leaving the algorithm unsaid.
                            .checksum_algorithm(ChecksumAlgorithm::Crc32),
                        &self.s.opts
                    )
                    .send()
                    .await
                    .map_err(|e| remote(&self.key, "starting a multipart upload", e))
                })
                .await?;
                let id = out.upload_id().unwrap_or_default().to_string();
                self.upload_id = Some(id.clone());
                id
            }
        };
        // At most `part_concurrency` parts of this store uploading at once (memory: that many
        // parts); collect finished ones as we go.
        let permit = self
            .s
            .parts
            .clone()
            .acquire_owned()
            .await
            .expect("the part semaphore is never closed");
        while let Some(r) = self.in_flight.try_join_next() {
            self.take_joined(r)?;
        }
        self.next_part += 1;
        let n = self.next_part;
        let (s, key, full) = (self.s.clone(), self.key.clone(), self.full.clone());
        self.in_flight.spawn(async move {
            let _permit = permit;
            let out = retry(&s.retry, "uploading a part", || async {
                s.client
                    .upload_part()
                    .bucket(&s.bucket)
                    .key(&full)
                    .upload_id(&id)
                    .part_number(n)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .body(ByteStream::from(data.clone()))
                    .customize()
                    .unsigned_unless(s.opts.sign_payload)
                    .send()
                    .await
                    .map_err(|e| remote(&key, "uploading a part", e))
            })
            .await?;
            Ok(CompletedPart::builder()
                .part_number(n)
                .set_e_tag(out.e_tag().map(str::to_string))
                .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                .build())
        });
        Ok(())
    }

    /// Waits for one part in flight.
    async fn join_one(&mut self) -> Result<(), StorageError> {
        match self.in_flight.join_next().await {
            None => Ok(()),
            Some(r) => self.take_joined(r),
        }
    }

    /// Records a finished part, or returns its failure.
    fn take_joined(
        &mut self,
        r: Result<Result<CompletedPart, StorageError>, tokio::task::JoinError>,
    ) -> Result<(), StorageError> {
        match r {
            Ok(Ok(part)) => {
                self.parts.push(part);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(StorageError::Remote {
                key: self.key.clone(),
                message: format!("a part upload task failed: {e}"),
                transient: false,
            }),
        }
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, mut data: Bytes) -> Result<(), StorageError> {
        self.size += data.len() as u64;
        // Whole parts of a chunk go out as they are (no copy: the uploader reads in parts).
        if self.buf.is_empty() {
            while data.len() >= PART_SIZE {
                let part = data.split_to(PART_SIZE);
                self.upload_part(part).await?;
            }
        }
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
            retry(&self.s.retry, "storing an object", || {
                self.s.put_with(&self.key, rest.clone(), self.mode)
            })
            .await?;
            return Ok(self.size);
        }
        if !rest.is_empty() {
            self.upload_part(rest).await?;
        }
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        let id = self.upload_id.take().expect("multipart started");
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        let create_new = self.mode == WriteMode::CreateNew;
        let r = retry(&self.s.retry, "completing a multipart upload", || async {
            self.s
                .client
                .complete_multipart_upload()
                .bucket(&self.s.bucket)
                .key(&self.full)
                .upload_id(&id)
                .set_if_none_match(create_new.then(|| "*".to_string()))
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts.clone()))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| remote(&self.key, "completing a multipart upload", e))
        })
        .await;
        if let Err(err) = r {
            self.upload_id = Some(id);
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
    async fn writer_with(
        &self,
        key: &str,
        mode: WriteMode,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let full = self.full(key)?;
        Ok(Box::new(S3Writer {
            s: self.clone(),
            key: key.to_string(),
            full,
            buf: BytesMut::new(),
            upload_id: None,
            parts: Vec::new(),
            in_flight: tokio::task::JoinSet::new(),
            next_part: 0,
            size: 0,
            mode,
        }))
    }

    async fn put_with(&self, key: &str, data: Bytes, mode: WriteMode) -> Result<(), StorageError> {
        let full = self.full(key)?;
        with_write_options!(
            self.client.put_object().bucket(&self.bucket).key(full),
            &self.opts
        )
        .set_if_none_match((mode == WriteMode::CreateNew).then(|| "*".to_string()))
        .checksum_algorithm(ChecksumAlgorithm::Crc32)
        .body(ByteStream::from(data))
        .customize()
        .unsigned_unless(self.opts.sign_payload)
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
        if self.opts.object_lock_mode.is_some() {
            return self.delete_versions(key, &full).await;
        }
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
