//! `[proxy.tls]`: the certificates the client listener terminates TLS with. They are read and
//! checked when the config is: a missing file, a file that is not PEM or holds no
//! certificate or key, or a key that is not the certificate's is an error naming the key, its
//! line and the file, for `check` and for a reload (which then keeps the certificates in
//! force). Relative paths are relative to the config file's directory.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{Error as TlsError, InconsistentKeys};
use toml::Spanned;

use super::diagnostics::FieldError;
use super::raw::{RawSni, RawTls};

/// `[proxy.tls]`: TLS on `proxy.listen` (all of its connections).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// `cert` and `key`: what a client gets when no `sni` entry names the server it asked
    /// for, or when it named none.
    pub default: TlsCertificate,
    /// `[[proxy.tls.sni]]`, in file order; server names are unique.
    pub sni: Vec<SniCertificate>,
}

/// One `[[proxy.tls.sni]]`: the certificate for one server name.
#[derive(Debug, Clone)]
pub struct SniCertificate {
    /// A DNS name, lowercase (as rustls gives the name a client asked for).
    pub server_name: String,
    pub certificate: TlsCertificate,
}

/// A certificate chain and its private key, as read from their PEM files.
#[derive(Debug, Clone)]
pub struct TlsCertificate {
    /// The files as opened: a relative path in the config is joined to its directory.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The chain (leaf first) and the key that signs for it, as rustls serves them.
    pub certified: Arc<CertifiedKey>,
}

/// Reads and checks `[proxy.tls]`; paths are relative to `dir`.
pub(super) fn validate_tls(raw: Spanned<RawTls>, dir: &Path) -> Result<TlsSettings, FieldError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let default = certificate("proxy.tls", raw.cert, raw.key, span, dir)?;
    let mut sni: Vec<SniCertificate> = Vec::new();
    for (i, entry) in raw.sni.unwrap_or_default().into_iter().enumerate() {
        let prefix = format!("proxy.tls.sni[{i}]");
        let span = entry.span();
        let RawSni {
            server_name,
            cert,
            key,
        } = entry.into_inner();
        let name_key = format!("{prefix}.server_name");
        let server_name =
            server_name.ok_or_else(|| FieldError::missing(name_key.as_str(), span.clone()))?;
        let name_span = server_name.span();
        let name = dns_name(&name_key, server_name)?;
        if sni
            .iter()
            .any(|earlier| earlier.server_name == name.as_ref())
        {
            return Err(FieldError::new(
                name_key,
                name_span,
                format!(
                    "{:?} is given a certificate already; one [[proxy.tls.sni]] per name",
                    name.as_ref()
                ),
            ));
        }
        let cert_span = cert.as_ref().map_or(span.clone(), Spanned::span);
        let certificate = certificate(&prefix, cert, key, span, dir)?;
        // A certificate that does not name the server it is given for fails every client's
        // check of it: a mistake to report now, not at the first handshake.
        let valid = certificate
            .certified
            .end_entity_cert()
            .and_then(ParsedCertificate::try_from)
            .and_then(|leaf| {
                rustls::client::verify_server_name(&leaf, &ServerName::DnsName(name.clone()))
            });
        if let Err(error) = valid {
            return Err(FieldError::new(
                format!("{prefix}.cert"),
                cert_span,
                format!(
                    "{}: the certificate is not valid for {:?} ({error})",
                    certificate.cert_file.display(),
                    name.as_ref()
                ),
            ));
        }
        sni.push(SniCertificate {
            server_name: name.as_ref().to_owned(),
            certificate,
        });
    }
    Ok(TlsSettings { default, sni })
}

/// A server name as `[[proxy.tls.sni]]` gives it: a DNS name (no IP address, no wildcard),
/// lowercased.
fn dns_name(key: &str, raw: Spanned<String>) -> Result<DnsName<'static>, FieldError> {
    DnsName::try_from(raw.get_ref().as_str())
        .map(|name| name.to_lowercase_owned())
        .map_err(|_| {
            FieldError::new(
                key,
                raw.span(),
                format!(
                    "{:?} is not a DNS name such as \"api.example.com\" (clients send no IP \
                     address or wildcard as a server name)",
                    raw.get_ref()
                ),
            )
        })
}

/// Reads `<prefix>.cert` and `<prefix>.key` (both required in the table at `table`) and
/// checks that they belong together.
fn certificate(
    prefix: &str,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    table: Range<usize>,
    dir: &Path,
) -> Result<TlsCertificate, FieldError> {
    let cert_key = format!("{prefix}.cert");
    let key_key = format!("{prefix}.key");
    let cert = cert.ok_or_else(|| FieldError::missing(cert_key.as_str(), table.clone()))?;
    let key = key.ok_or_else(|| FieldError::missing(key_key.as_str(), table))?;
    let (cert_span, key_span) = (cert.span(), key.span());
    let cert_file = file_path(&cert_key, &cert, dir)?;
    let key_file = file_path(&key_key, &key, dir)?;
    let chain =
        read_chain(&cert_file).map_err(|m| FieldError::new(&cert_key, cert_span.clone(), m))?;
    let private =
        read_key(&key_file).map_err(|m| FieldError::new(&key_key, key_span.clone(), m))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private).map_err(|error| {
        FieldError::new(
            &key_key,
            key_span.clone(),
            format!(
                "{}: not a key the proxy can sign with (RSA, ECDSA P-256 or P-384, Ed25519): \
                 {error}",
                key_file.display()
            ),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // (`Unknown`: the key cannot tell its public half; rustls serves it all the same.)
        Ok(()) | Err(TlsError::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(TlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(FieldError::new(
                key_key,
                key_span,
                format!(
                    "{} is not the key of the certificate in {} (the first certificate of the \
                     file must be the server's own, then its chain)",
                    key_file.display(),
                    cert_file.display()
                ),
            ));
        }
        Err(error) => {
            return Err(FieldError::new(
                cert_key,
                cert_span,
                format!(
                    "{}: its first certificate cannot be read: {error}",
                    cert_file.display()
                ),
            ));
        }
    }
    Ok(TlsCertificate {
        cert_file,
        key_file,
        certified: Arc::new(certified),
    })
}

/// The file a path in the config names: relative to the config file's directory.
fn file_path(key: &str, raw: &Spanned<String>, dir: &Path) -> Result<PathBuf, FieldError> {
    if raw.get_ref().is_empty() {
        return Err(FieldError::new(key, raw.span(), "must not be empty"));
    }
    Ok(dir.join(raw.get_ref()))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
}

/// The certificates of a PEM file, in order (the server's own first).
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| not_pem(path, &error))?;
    if chain.is_empty() {
        return Err(format!(
            "{} holds no certificate (no -----BEGIN CERTIFICATE----- block)",
            path.display()
        ));
    }
    Ok(chain)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| match error {
        pem::Error::NoItemsFound => format!(
            "{} holds no private key (no -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC \
             PRIVATE KEY block)",
            path.display()
        ),
        error => not_pem(path, &error),
    })
}

fn not_pem(path: &Path, error: &pem::Error) -> String {
    format!("{} is not a valid PEM file: {error}", path.display())
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, parse_relative_to};
    use std::path::Path;

    const BACKEND: &str =
        "[[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:8081\"]\nweight = 1\n";

    /// Writes `NAME.pem` and `NAME.key` into `dir`: a self-signed certificate for `names`
    /// and its key.
    fn pair(dir: &Path, name: &str, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let made = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), made.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{name}.key")),
            made.signing_key.serialize_pem(),
        )
        .unwrap();
    }

    /// `[proxy.tls]` with `lines` (line 2 on), then a backend, parsed relative to `dir`.
    fn parse(dir: &Path, lines: &[&str]) -> Result<super::super::Config, ConfigError> {
        let text = format!("[proxy.tls]\n{}\n{BACKEND}", lines.join("\n"));
        parse_relative_to(&text, "canary.toml", dir)
    }

    /// The (line, key, message) of a config that must fail.
    #[track_caller]
    fn refused(dir: &Path, lines: &[&str]) -> (usize, String, String) {
        match parse(dir, lines) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            Err(other) => panic!("expected an invalid config, got {other}"),
            Ok(_) => panic!("expected an error for {lines:?}"),
        }
    }

    #[test]
    fn certificates_are_read_relative_to_the_config_and_picked_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        pair(&dir.path().join("certs"), "site", &["localhost"]);
        pair(dir.path(), "api", &["api.example.com"]);
        let config = parse(
            dir.path(),
            &[
                "cert = \"certs/site.pem\"",
                "key = \"certs/site.key\"",
                "[[proxy.tls.sni]]",
                "server_name = \"API.example.com\"",
                "cert = \"api.pem\"",
                "key = \"api.key\"",
            ],
        )
        .unwrap();
        let tls = config.proxy.tls.unwrap();
        assert_eq!(tls.default.cert_file, dir.path().join("certs/site.pem"));
        assert_eq!(tls.sni.len(), 1);
        assert_eq!(tls.sni[0].server_name, "api.example.com");
        assert_eq!(tls.sni[0].certificate.key_file, dir.path().join("api.key"));
        // An absolute path stays as it is.
        let absolute = dir.path().join("api.pem");
        let absolute_key = dir.path().join("api.key");
        let config = parse(
            Path::new("/nonexistent"),
            &[
                &format!("cert = {:?}", absolute.display().to_string()),
                &format!("key = {:?}", absolute_key.display().to_string()),
            ],
        )
        .unwrap();
        assert_eq!(config.proxy.tls.unwrap().default.cert_file, absolute);
    }

    #[test]
    fn bad_files_name_the_key_the_line_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pair(d, "site", &["localhost"]);
        pair(d, "other", &["localhost"]);
        std::fs::write(d.join("text.pem"), "not a certificate\n").unwrap();
        std::fs::write(
            d.join("broken.pem"),
            "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            d.join("garbage.pem"),
            "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let file = |name: &str| d.join(name).display().to_string();
        for (lines, line, key, says) in [
            (
                &["cert = \"missing.pem\"", "key = \"site.key\""][..],
                2,
                "proxy.tls.cert",
                format!("cannot read {}", file("missing.pem")),
            ),
            (
                &["cert = \"text.pem\"", "key = \"site.key\""][..],
                2,
                "proxy.tls.cert",
                format!("{} holds no certificate", file("text.pem")),
            ),
            (
                &["cert = \"broken.pem\"", "key = \"site.key\""][..],
                2,
                "proxy.tls.cert",
                format!("{} is not a valid PEM file", file("broken.pem")),
            ),
            (
                &["cert = \"garbage.pem\"", "key = \"site.key\""][..],
                2,
                "proxy.tls.cert",
                format!(
                    "{}: its first certificate cannot be read",
                    file("garbage.pem")
                ),
            ),
            (
                &["cert = \"site.pem\"", "key = \"site.pem\""][..],
                3,
                "proxy.tls.key",
                format!("{} holds no private key", file("site.pem")),
            ),
            (
                &["cert = \"site.pem\"", "key = \"other.key\""][..],
                3,
                "proxy.tls.key",
                format!(
                    "{} is not the key of the certificate in {}",
                    file("other.key"),
                    file("site.pem")
                ),
            ),
            (
                &["cert = \"site.pem\""][..],
                1,
                "proxy.tls.key",
                "required key is missing".to_owned(),
            ),
            (
                &["cert = \"\"", "key = \"site.key\""][..],
                2,
                "proxy.tls.cert",
                "must not be empty".to_owned(),
            ),
        ] {
            let (got_line, got_key, message) = refused(d, lines);
            assert_eq!((got_line, got_key.as_str()), (line, key), "{message}");
            assert!(message.contains(&says), "{key}: {message}");
        }
    }

    #[test]
    fn sni_entries_need_a_dns_name_of_their_own_that_their_certificate_covers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pair(d, "site", &["localhost"]);
        pair(d, "api", &["api.example.com"]);
        let head = ["cert = \"site.pem\"", "key = \"site.key\""];
        let entry = |name: &str, cert: &str| {
            [
                "[[proxy.tls.sni]]".to_owned(),
                format!("server_name = {name:?}"),
                format!("cert = \"{cert}.pem\""),
                format!("key = \"{cert}.key\""),
            ]
        };
        let with = |entries: &[[String; 4]]| -> Vec<String> {
            let mut lines: Vec<String> = head.iter().map(|l| l.to_string()).collect();
            for e in entries {
                lines.extend(e.iter().cloned());
            }
            lines
        };
        for (lines, line, key, says) in [
            (
                with(&[entry("10.0.0.1", "api")]),
                5,
                "proxy.tls.sni[0].server_name",
                "is not a DNS name",
            ),
            (
                with(&[entry("www.example.com", "api")]),
                6,
                "proxy.tls.sni[0].cert",
                "not valid for \"www.example.com\"",
            ),
            (
                with(&[
                    entry("api.example.com", "api"),
                    entry("API.example.com", "api"),
                ]),
                9,
                "proxy.tls.sni[1].server_name",
                "given a certificate already",
            ),
        ] {
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            let (got_line, got_key, message) = refused(d, &lines);
            assert_eq!((got_line, got_key.as_str()), (line, key), "{message}");
            assert!(message.contains(says), "{key}: {message}");
        }
        let mut missing = with(&[]);
        missing.extend([
            "[[proxy.tls.sni]]".to_owned(),
            "cert = \"api.pem\"".to_owned(),
        ]);
        let lines: Vec<&str> = missing.iter().map(String::as_str).collect();
        let (_, key, message) = refused(d, &lines);
        assert_eq!(key, "proxy.tls.sni[0].server_name", "{message}");
    }

    #[test]
    fn secure_cookie_prefixes_are_allowed_over_tls_only() {
        let dir = tempfile::tempdir().unwrap();
        pair(dir.path(), "site", &["localhost"]);
        let text = |tls: bool| {
            let tls = if tls {
                "[proxy.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\n"
            } else {
                ""
            };
            format!("[proxy]\nsticky_cookie = \"__Host-uid\"\n{tls}{BACKEND}")
        };
        let config = parse_relative_to(&text(true), "t.toml", dir.path()).unwrap();
        assert_eq!(config.proxy.sticky_cookie.as_deref(), Some("__Host-uid"));
        let error = parse_relative_to(&text(false), "t.toml", dir.path()).unwrap_err();
        assert!(error.to_string().contains("[proxy.tls]"), "{error}");
    }
}
