//! ZeroMQ CURVE for the ingest and the PUB socket: encryption, and only the peers whose public
//! keys the config lists let in. Keys live in ZeroMQ certificate files (the zcert format
//! pyzmq's `zmq.auth` reads and writes: `NAME.key` public, `NAME.key_secret` secret), made by
//! `mirage keygen`; the config names files, never keys, so no secret lands in a session folder.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `[ingest.curve]` / `[publish.curve]`: the daemon's certificate and its peers'.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurveConfig {
    /// The daemon's secret certificate (`NAME.key_secret`); none: no CURVE.
    pub secret: Option<PathBuf>,
    /// The peers let in: public certificates (`NAME.key`) or folders of them (every `*.key`).
    pub clients: Vec<PathBuf>,
}

impl crate::settings::InputFiles for CurveConfig {
    /// The secret key and the allowed clients' certificates.
    fn resolve_inputs(&mut self, base: &Path) {
        self.secret.iter_mut().chain(self.clients.iter_mut()).for_each(|p| crate::settings::rebase(p, base));
    }
}

impl CurveConfig {
    /// Whether CURVE is asked for.
    pub fn enabled(&self) -> bool {
        self.secret.is_some()
    }
}

/// Whether this build's libzmq has CURVE (it is linked to libsodium).
pub fn available() -> bool {
    zmq::has("curve") == Some(true)
}

/// CURVE, or what to do to get it.
pub fn require() -> Result<(), String> {
    match available() {
        true => Ok(()),
        false => Err("this build's libzmq has no CURVE (libsodium-dev was missing when it was built): run \
                      scripts/setup.sh, then `cargo clean -p zmq-sys` and rebuild"
            .into()),
    }
}

/// A key pair in Z85 text, as certificate files hold it.
#[derive(Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The public key, Z85 (40 characters).
    pub public: String,
    /// The secret key, Z85, when the file holds it.
    pub secret: Option<String>,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Certificate({}, secret: {})", self.public, self.secret.is_some())
    }
}

/// A Z85 key's 32 bytes, or why it is not one.
fn key_bytes(z85: &str) -> Result<[u8; 32], String> {
    if z85.len() != 40 {
        return Err(format!("a CURVE key is 40 Z85 characters, not {}", z85.len()));
    }
    let v = zmq::z85_decode(z85).map_err(|e| format!("not a Z85 key: {e}"))?;
    v.try_into().map_err(|_| "not a 32-byte key".to_string())
}

impl Certificate {
    /// Reads a certificate file as `zmq.auth.load_certificate` does: the `public-key` and
    /// `secret-key` lines, quotes stripped, comments skipped.
    pub fn read(path: &Path) -> Result<Certificate, String> {
        let err = |e: String| format!("{}: {e}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.len() > 64 * 1024 {
            return Err(err("too large for a certificate".into()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let (mut public, mut secret) = (None, None);
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let value =
                |l: &str| l.split_once('=').map(|(_, v)| v.trim_matches([' ', '\t', '"', '\'']).to_string());
            if line.starts_with("public-key") {
                public = value(line);
            } else if line.starts_with("secret-key") {
                secret = value(line);
            }
        }
        let public = public.ok_or_else(|| err("no public-key line: not a ZeroMQ certificate".into()))?;
        key_bytes(&public).map_err(|e| err(format!("public-key: {e}")))?;
        if let Some(s) = &secret {
            key_bytes(s).map_err(|e| err(format!("secret-key: {e}")))?;
        }
        Ok(Certificate { public, secret })
    }

    /// The secret key's 32 bytes; `path` (the file read) names it in the error. A file that
    /// others may read is refused, as OpenSSH refuses such private keys.
    fn secret_key(&self, path: &Path) -> Result<[u8; 32], String> {
        let secret = self
            .secret
            .as_deref()
            .ok_or_else(|| format!("{} holds no secret-key (give the .key_secret file)", path.display()))?;
        owner_only(path)?;
        key_bytes(secret)
    }

    /// A new key pair from libzmq (libsodium's generator).
    pub fn generate() -> Result<Certificate, String> {
        let pair = zmq::CurveKeyPair::new().map_err(|e| format!("cannot make a CURVE key pair: {e}"))?;
        let z85 = |k: &[u8]| zmq::z85_encode(k).map_err(|e| e.to_string());
        Ok(Certificate { public: z85(&pair.public_key)?, secret: Some(z85(&pair.secret_key)?) })
    }

    /// Writes `PREFIX.key` (public) and `PREFIX.key_secret` (both keys, owner-only), as pyzmq's
    /// `create_certificates` does; refuses to overwrite either.
    pub fn write(&self, prefix: &Path) -> Result<(PathBuf, PathBuf), String> {
        let public_path = PathBuf::from(format!("{}.key", prefix.display()));
        let secret_path = PathBuf::from(format!("{}.key_secret", prefix.display()));
        let secret = self.secret.as_deref().ok_or("a certificate without its secret key")?;
        let banner = |kind: &str| {
            format!(
                "#   ****  Generated by mirage-rt {}  ****\n#   ZeroMQ CURVE {kind} Certificate\n\n",
                env!("CARGO_PKG_VERSION")
            )
        };
        let body = |secret: Option<&str>| {
            let mut s = format!("metadata\ncurve\n    public-key = \"{}\"\n", self.public);
            if let Some(k) = secret {
                s.push_str(&format!("    secret-key = \"{k}\"\n"));
            }
            s
        };
        write_new(&public_path, &format!("{}{}", banner("Public"), body(None)), 0o644)?;
        write_new(&secret_path, &format!("{}{}", banner("**Secret**"), body(Some(secret))), 0o600)?;
        Ok((public_path, secret_path))
    }
}

/// Refuses a secret file that group or others may read or write: anyone on the machine could
/// then pose as its owner. pyzmq's `create_certificates` leaves them as the umask makes them.
fn owner_only(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.permissions().mode();
    match mode & 0o077 {
        0 => Ok(()),
        _ => Err(format!(
            "{}: a secret key that others can access (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )),
    }
}

/// Creates `path` with `text` and permissions `mode`, failing if it exists.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// A listener's CURVE, loaded: its secret key and the public keys of the peers let in.
#[derive(Clone)]
pub struct Curve {
    secret: [u8; 32],
    /// The daemon's public key (Z85): what peers set as their server key.
    pub public: String,
    clients: BTreeSet<[u8; 32]>,
}

impl std::fmt::Debug for Curve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Curve({}, {} clients)", self.public, self.clients.len())
    }
}

impl Curve {
    /// Loads `cfg` (`what` names its section in errors); `None` when it asks for no CURVE.
    pub fn load(cfg: &CurveConfig, what: &str) -> Result<Option<Curve>, String> {
        let Some(secret_path) = &cfg.secret else { return Ok(None) };
        let secret_err = |e: String| format!("{what}.secret: {e}");
        require().map_err(secret_err)?;
        let cert = Certificate::read(secret_path).map_err(secret_err)?;
        let secret = cert.secret_key(secret_path).map_err(secret_err)?;
        let mut clients = BTreeSet::new();
        for path in &cfg.clients {
            for file in certificate_files(path).map_err(|e| format!("{what}.clients: {e}"))? {
                let c = Certificate::read(&file).map_err(|e| format!("{what}.clients: {e}"))?;
                clients.insert(key_bytes(&c.public).map_err(|e| format!("{what}.clients: {e}"))?);
            }
        }
        if clients.is_empty() {
            return Err(format!(
                "{what}.clients: no client certificates: CURVE would let in anyone who has the \
                 daemon's public key; list the peers' NAME.key files (mirage keygen makes them)"
            ));
        }
        Ok(Some(Curve { secret, public: cert.public, clients }))
    }

    /// A CURVE from keys in hand (`public` in Z85), letting in `clients`.
    pub fn from_keys(secret: [u8; 32], public: String, clients: impl IntoIterator<Item = [u8; 32]>) -> Curve {
        Curve { secret, public, clients: clients.into_iter().collect() }
    }

    /// Makes `socket` a CURVE server with this key (before it binds).
    pub fn serve(&self, socket: &zmq::Socket) -> Result<(), zmq::Error> {
        socket.set_curve_server(true)?;
        socket.set_curve_secretkey(&self.secret)
    }

    /// Whether a peer presenting public key `key` is let in.
    pub fn lets_in(&self, key: &[u8]) -> bool {
        <&[u8; 32]>::try_from(key).is_ok_and(|k| self.clients.contains(k))
    }
}

/// A peer's side of CURVE (a sender, a subscriber): the daemon's public key and its own pair.
#[derive(Clone)]
pub struct ClientCurve {
    server: [u8; 32],
    public: [u8; 32],
    secret: [u8; 32],
}

impl std::fmt::Debug for ClientCurve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCurve(…)")
    }
}

impl ClientCurve {
    /// Loads the daemon's public certificate `server` and the peer's secret certificate `own`.
    pub fn load(server: &Path, own: &Path) -> Result<ClientCurve, String> {
        require()?;
        let server = key_bytes(&Certificate::read(server)?.public)?;
        let own_cert = Certificate::read(own)?;
        Ok(ClientCurve { server, public: key_bytes(&own_cert.public)?, secret: own_cert.secret_key(own)? })
    }

    /// Makes `socket` a CURVE client of the daemon (before it connects).
    pub fn apply(&self, socket: &zmq::Socket) -> Result<(), zmq::Error> {
        socket.set_curve_serverkey(&self.server)?;
        socket.set_curve_publickey(&self.public)?;
        socket.set_curve_secretkey(&self.secret)
    }
}

/// `path` itself, or every `*.key` in it when it is a folder (sorted).
fn certificate_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendored libzmq is linked to libsodium (scripts/setup.sh installs libsodium-dev).
    #[test]
    fn this_build_has_curve() {
        assert!(available(), "libzmq without CURVE: was libsodium-dev installed before building?");
    }

    #[test]
    fn certificates_round_trip_and_folders_list_their_public_files() {
        let dir = tempfile::tempdir().unwrap();
        let cert = Certificate::generate().unwrap();
        let (public, secret) = cert.write(&dir.path().join("scanner")).unwrap();
        assert_eq!(Certificate::read(&secret).unwrap(), cert);
        assert_eq!(
            Certificate::read(&public).unwrap(),
            Certificate { public: cert.public.clone(), secret: None }
        );
        assert!(cert.write(&dir.path().join("scanner")).is_err(), "never overwrites");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(certificate_files(dir.path()).unwrap(), vec![public.clone()]);

        let curve = Curve::load(
            &CurveConfig { secret: Some(secret), clients: vec![dir.path().into()] },
            "ingest.curve",
        )
        .unwrap()
        .unwrap();
        assert!(curve.lets_in(&zmq::z85_decode(&cert.public).unwrap()));
        assert!(!curve.lets_in(&[0u8; 32]) && !curve.lets_in(b"short"));
    }

    #[test]
    fn bad_certificates_and_settings_are_refused_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "curve\n    public-key = \"tooshort\"\n").unwrap();
        assert!(Certificate::read(&bad).unwrap_err().contains("40 Z85 characters"));
        std::fs::write(&bad, "just text\n").unwrap();
        assert!(Certificate::read(&bad).unwrap_err().contains("no public-key"));

        let cert = Certificate::generate().unwrap();
        let (public, secret) = cert.write(&dir.path().join("daemon")).unwrap();
        let load = |secret: PathBuf, clients: Vec<PathBuf>| {
            Curve::load(&CurveConfig { secret: Some(secret), clients }, "publish.curve").unwrap_err()
        };
        assert!(load(public.clone(), vec![public.clone()]).contains("publish.curve.secret"));
        assert!(load(secret.clone(), vec![]).contains("publish.curve.clients: no client"));
        assert!(load(secret.clone(), vec![bad]).contains("publish.curve.clients"));
        assert!(Curve::load(&CurveConfig::default(), "x").unwrap().is_none());

        // A secret others can read (as pyzmq's create_certificates leaves it) is refused.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(secret.clone(), vec![public.clone()]);
        assert!(e.contains("others can access (mode 644)") && e.contains("chmod 600"), "{e}");
        assert!(ClientCurve::load(&public, &secret).unwrap_err().contains("mode 644"));
    }
}
