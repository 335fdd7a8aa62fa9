//! `[backend.tls]`: how a backend's `https://` endpoints are reached. The rustls client config
//! is built here, while the file is validated, so that a CA file that cannot be read is a
//! `check` error naming the key and the file, and a reload that breaks it changes nothing.
//!
//! Verification is on by default, against the system's trust store (read once per process,
//! as curl and nginx read it) plus the backend's own `ca`. `insecure_skip_verify` accepts any
//! certificate: the handshake's signature is still checked, so the connection is encrypted
//! to whoever holds the certificate's key, but nobody vouches for who that is.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// The TLS versions spoken on both sides (the listener's and upstreams').
pub static TLS_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The crypto the proxy uses on both sides: rustls's `ring` provider.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// `[backend.tls]` as validated, with the client config every TLS connection of the backend
/// uses. Two are equal when their settings and the CA file's certificates are: a reload
/// that changes neither keeps the backend's connections.
#[derive(Clone)]
pub struct BackendTls {
    /// `ca`: an extra trust anchor file (PEM), resolved against the config file's directory.
    pub ca: Option<PathBuf>,
    /// `server_name`: the name sent in SNI and verified; `None`: each URL's host.
    pub server_name: Option<ServerName<'static>>,
    /// `insecure_skip_verify`: any certificate is accepted (a warning is logged at start).
    pub insecure_skip_verify: bool,
    /// The certificates read from `ca`, kept to tell whether a reload changed them.
    ca_certificates: Vec<CertificateDer<'static>>,
    /// The config connections are made with; ALPN `h2` for `protocol = "h2"`, else
    /// `http/1.1`.
    pub client: Arc<ClientConfig>,
}

impl PartialEq for BackendTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca
            && self.server_name == other.server_name
            && self.insecure_skip_verify == other.insecure_skip_verify
            && self.ca_certificates == other.ca_certificates
            && self.client.alpn_protocols == other.client.alpn_protocols
    }
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish_non_exhaustive()
    }
}

/// Why `[backend.tls]` could not be built; `key` is the field at fault.
#[derive(Debug)]
pub(super) struct TlsSettingError {
    pub(super) key: &'static str,
    pub(super) message: String,
}

impl BackendTls {
    /// Builds the client config, offering `alpn`. `ca` is resolved against `base` (the
    /// config file's directory) when relative.
    pub(super) fn new(
        ca: Option<&str>,
        server_name: Option<&str>,
        insecure_skip_verify: bool,
        base: &Path,
        alpn: &[u8],
    ) -> Result<Self, TlsSettingError> {
        let server_name = server_name
            .map(|name| {
                ServerName::try_from(name.to_owned()).map_err(|_| TlsSettingError {
                    key: "server_name",
                    message: format!("{name:?} is neither a DNS name nor an IP address"),
                })
            })
            .transpose()?;
        let ca = ca.map(|path| base.join(path));
        let ca_certificates = match &ca {
            None => Vec::new(),
            Some(path) => {
                read_certificates(path).map_err(|message| TlsSettingError { key: "ca", message })?
            }
        };
        let provider = crypto_provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(TLS_VERSIONS)
            .map_err(|e| TlsSettingError {
                key: "ca",
                message: format!("TLS setup failed: {e}"),
            })?;
        let mut client = if insecure_skip_verify {
            let verifier = AnyCertificate(provider.signature_verification_algorithms);
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        } else {
            let mut roots = system_roots().clone();
            roots.add_parsable_certificates(ca_certificates.iter().cloned());
            if roots.is_empty() {
                return Err(TlsSettingError {
                    key: "ca",
                    message: "no trust anchors: the system has no CA certificates and no `ca` \
                              is given"
                        .to_owned(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        client.alpn_protocols = vec![alpn.to_vec()];
        Ok(BackendTls {
            ca,
            server_name,
            insecure_skip_verify,
            ca_certificates,
            client: Arc::new(client),
        })
    }
}

/// The certificates of a PEM file: at least one, all of them parsable as trust anchors.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown} is not a PEM file: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("{shown} holds no certificate (PEM `CERTIFICATE`)"));
    }
    let mut store = RootCertStore::empty();
    let (_, unusable) = store.add_parsable_certificates(certificates.iter().cloned());
    if unusable > 0 {
        return Err(format!(
            "{shown}: {unusable} of {} certificates cannot be a trust anchor",
            certificates.len()
        ));
    }
    Ok(certificates)
}

/// The system's trust store, read once; empty (with a warning) when there is none.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "reading the system's CA certificates");
        }
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(found.certs);
        roots
    })
}

/// `insecure_skip_verify`: any certificate is taken as the server's; only the handshake's
/// signature by its key is checked.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The ALPN names of the protocols spoken to upstreams over TLS.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_H2: &[u8] = b"h2";

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP1: &[u8] = ALPN_HTTP1;
    const H2: &[u8] = ALPN_H2;

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let missing =
            BackendTls::new(Some("nope.pem"), None, false, dir.path(), HTTP1).unwrap_err();
        assert_eq!(missing.key, "ca");
        assert!(missing.message.contains("nope.pem"), "{}", missing.message);

        std::fs::write(dir.path().join("empty.pem"), "not pem at all\n").unwrap();
        let empty = BackendTls::new(Some("empty.pem"), None, false, dir.path(), HTTP1).unwrap_err();
        assert!(
            empty.message.contains("holds no certificate"),
            "{}",
            empty.message
        );

        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        let tls = BackendTls::new(
            Some("ca.pem"),
            Some("v2.internal"),
            false,
            dir.path(),
            HTTP1,
        )
        .unwrap();
        assert_eq!(tls.ca.as_deref(), Some(dir.path().join("ca.pem").as_path()));
        assert_eq!(tls.client.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn a_server_name_must_be_a_name_or_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let bad = BackendTls::new(None, Some("not a name"), true, dir.path(), HTTP1).unwrap_err();
        assert_eq!(bad.key, "server_name");
        let ip = BackendTls::new(None, Some("10.0.0.7"), true, dir.path(), H2).unwrap();
        assert!(matches!(ip.server_name, Some(ServerName::IpAddress(_))));
        assert_eq!(ip.client.alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn equal_settings_are_equal_and_a_changed_ca_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let ca = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        };
        write("one.test");
        let a = BackendTls::new(Some("ca.pem"), None, false, dir.path(), HTTP1).unwrap();
        let b = BackendTls::new(Some("ca.pem"), None, false, dir.path(), HTTP1).unwrap();
        assert_eq!(a, b);
        write("two.test");
        let c = BackendTls::new(Some("ca.pem"), None, false, dir.path(), HTTP1).unwrap();
        assert_ne!(a, c, "same path, new certificate");
    }
}
