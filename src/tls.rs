//! TLS on the client listener (`[proxy.tls]`): the rustls server config (the `ring`
//! provider; TLS 1.3 and 1.2 only; ALPN `h2`, then `http/1.1`) and the certificates it
//! serves, chosen by the server name a client asks for (SNI), else the default one.
//!
//! The certificates sit behind one `ArcSwap`, read once per handshake: a reload replaces
//! them whole ([`ListenerTls::replace`]), so handshakes from then on get the new ones while
//! connections already open keep the session they have.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{TLS_VERSIONS, TlsSettings, crypto_provider};

/// A connection that agreed on ALPN `h2` is served by the HTTP/2 server; any other
/// (`http/1.1`, or none) is HTTP/1.
pub use crate::config::ALPN_H2;
use crate::config::ALPN_HTTP1;

/// The listener's TLS: what accepts a connection's handshake, and its certificates.
pub struct ListenerTls {
    certificates: Arc<Certificates>,
    acceptor: TlsAcceptor,
}

impl ListenerTls {
    pub fn new(settings: &TlsSettings) -> Result<Self, rustls::Error> {
        let certificates = Arc::new(Certificates {
            current: ArcSwap::from_pointee(CertificateSet::new(settings)),
        });
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(TLS_VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(ListenerTls {
            certificates,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Takes the handshake of a client connection (one acceptor serves every worker).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Serves `settings`' certificates to handshakes from now on.
    pub fn replace(&self, settings: &TlsSettings) {
        self.certificates
            .current
            .store(Arc::new(CertificateSet::new(settings)));
    }
}

/// The certificates in force, as rustls asks for them.
#[derive(Debug)]
struct Certificates {
    current: ArcSwap<CertificateSet>,
}

/// The default certificate and those of `[[proxy.tls.sni]]`, by lowercase server name.
#[derive(Debug)]
struct CertificateSet {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl CertificateSet {
    fn new(settings: &TlsSettings) -> Self {
        CertificateSet {
            default: settings.default.certified.clone(),
            by_name: settings
                .sni
                .iter()
                .map(|sni| (sni.server_name.clone(), sni.certificate.certified.clone()))
                .collect(),
        }
    }

    /// The certificate for a client that asked for `server_name` (lowercase, as rustls
    /// gives it): the one named so, else the default.
    fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        server_name
            .and_then(|name| self.by_name.get(name))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(client_hello.server_name()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[proxy.tls]` with a default certificate and one for `api.example.com`.
    fn settings(dir: &std::path::Path) -> TlsSettings {
        for (name, san) in [("site", "localhost"), ("api", "api.example.com")] {
            let made = rcgen::generate_simple_self_signed(vec![san.to_owned()]).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), made.cert.pem()).unwrap();
            std::fs::write(
                dir.join(format!("{name}.key")),
                made.signing_key.serialize_pem(),
            )
            .unwrap();
        }
        let text = "[proxy.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\n\
                    [[proxy.tls.sni]]\nserver_name = \"api.example.com\"\n\
                    cert = \"api.pem\"\nkey = \"api.key\"\n\
                    [[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:1\"]\nweight = 1\n";
        crate::config::parse_relative_to(text, "t.toml", dir)
            .unwrap()
            .proxy
            .tls
            .unwrap()
    }

    #[test]
    fn a_name_gets_its_certificate_and_any_other_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        let set = CertificateSet::new(&settings);
        let api = &settings.sni[0].certificate.certified;
        let default = &settings.default.certified;
        assert!(Arc::ptr_eq(set.pick(Some("api.example.com")), api));
        assert!(Arc::ptr_eq(set.pick(Some("www.example.com")), default));
        assert!(Arc::ptr_eq(set.pick(None), default));
    }

    #[test]
    fn the_listener_offers_h2_then_http1() {
        let dir = tempfile::tempdir().unwrap();
        let tls = ListenerTls::new(&settings(dir.path())).unwrap();
        let acceptor = tls.acceptor();
        let offered = &acceptor.config().alpn_protocols;
        assert_eq!(offered, &[b"h2".to_vec(), b"http/1.1".to_vec()]);
    }
}
