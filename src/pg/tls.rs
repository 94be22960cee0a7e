//! TLS for the server connection with rustls, following libpq's `sslmode` semantics:
//! `prefer`/`require` encrypt without verifying (unless `require` finds a root certificate, which
//! makes it `verify-ca`, as in libpq), `verify-ca` checks the chain, `verify-full` also the host name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::conninfo::{ConnInfo, SslMode};
use super::PgError;

/// Whether certificate checks apply, after libpq's `require` + root-cert upgrade.
pub(crate) fn effective_mode(ci: &ConnInfo) -> SslMode {
    match ci.sslmode {
        SslMode::Require if ci.sslrootcert.is_some() => SslMode::VerifyCa,
        m => m,
    }
}

fn tls_err(e: impl std::fmt::Display) -> PgError {
    PgError::Tls(e.to_string())
}

fn load_roots(ci: &ConnInfo) -> Result<RootCertStore, PgError> {
    let mut roots = RootCertStore::empty();
    match ci.sslrootcert.as_deref() {
        Some("system") => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| PgError::Tls(format!("could not read root certificate file \"{path}\": {e}")))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(cert.map_err(tls_err)?).map_err(tls_err)?;
            }
            if roots.is_empty() {
                return Err(PgError::Tls(format!("no certificates found in \"{path}\"")));
            }
        }
        None => {
            return Err(PgError::Tls(
                "root certificate file \"~/.postgresql/root.crt\" does not exist; either provide the file, use the system's trusted roots with sslrootcert=system, or change sslmode to disable server certificate verification".into(),
            ))
        }
    }
    Ok(roots)
}

pub(crate) fn client_config(ci: &ConnInfo) -> Result<Arc<ClientConfig>, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let builder = match effective_mode(ci) {
        SslMode::VerifyFull => builder.with_root_certificates(load_roots(ci)?),
        mode => {
            let chain = if mode == SslMode::VerifyCa {
                let roots = Arc::new(load_roots(ci)?);
                let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
                Some(verifier.build().map_err(tls_err)?)
            } else {
                None
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Relaxed { chain, provider }))
        }
    };
    let config = match (&ci.sslcert, &ci.sslkey) {
        (Some(cert), Some(key)) => {
            let certs =
                rustls_pemfile::certs(&mut std::fs::read(cert).map_err(tls_err)?.as_slice())
                    .collect::<Result<Vec<CertificateDer<'static>>, _>>()
                    .map_err(tls_err)?;
            let key: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut std::fs::read(key).map_err(tls_err)?.as_slice())
                    .map_err(tls_err)?
                    .ok_or_else(|| {
                        PgError::Tls(format!("no private key in \"{}\"", key.display()))
                    })?;
            builder.with_client_auth_cert(certs, key).map_err(tls_err)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, PgError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| PgError::Tls(format!("invalid server name \"{host}\": {e}")))
}

/// The server check of `prefer`/`require` (none: encryption without authentication of the
/// server, as in libpq) and of `verify-ca` (`chain`: the chain must lead to a trusted root; the
/// name is not checked). Handshake signatures are always verified.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
