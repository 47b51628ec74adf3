//! The allow-list and the address guard of outbound calls: which URLs Carina may call, and which
//! resolved addresses it may connect to (loopback, link-local, private and other non-public
//! ranges only where an allow-list entry says so).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// One `[[outbound.allow]]` entry: a URL prefix (scheme, host, port and path prefix).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// `scheme://host[:port][/path/prefix]`; a URL is allowed when it has the same scheme, host
    /// and port and its path starts with the prefix at a segment boundary.
    pub url: String,
    /// Also connect when the host resolves to a loopback, link-local, private or other
    /// non-public address (a PACS on the hospital network). Off by default.
    #[serde(default)]
    pub allow_private: bool,
}

/// A parsed allow-list entry.
#[derive(Debug, Clone)]
pub struct Allowed {
    scheme: String,
    host: String,
    port: u16,
    path: String,
    /// Non-public addresses allowed for this host.
    pub allow_private: bool,
}

/// Why a URL may not be called.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    /// Not a usable absolute http(s) URL.
    #[error("not a usable http(s) URL: {0}")]
    BadUrl(String),
    /// No allow-list entry covers it.
    #[error("not on the outbound allow-list: {0}")]
    NotAllowed(String),
    /// The host is or resolves to an address that is refused.
    #[error("non-public address {1} not permitted by the allow-list for {0}")]
    PrivateAddress(String, IpAddr),
    /// The host does not resolve.
    #[error("does not resolve: {0}")]
    Unresolved(String),
}

impl Allowed {
    /// Parses an entry.
    ///
    /// # Errors
    /// [`GuardError::BadUrl`] when the URL is not `http(s)://host[:port][/path]` without
    /// credentials, query or fragment.
    pub fn parse(entry: &AllowEntry) -> Result<Self, GuardError> {
        let url = reqwest::Url::parse(&entry.url)
            .map_err(|e| GuardError::BadUrl(format!("{}: {e}", entry.url)))?;
        check_shape(&url)?;
        let host = host_of(&url)?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| GuardError::BadUrl(entry.url.clone()))?;
        Ok(Self {
            scheme: url.scheme().to_string(),
            host,
            port,
            path: url.path().trim_end_matches('/').to_string(),
            allow_private: entry.allow_private,
        })
    }

    /// An entry for a destination named in Carina's own configuration (IRIS, a STOW-RS
    /// destination, the token issuer): the administrator chose it, so private addresses are
    /// allowed for it.
    ///
    /// # Errors
    /// As [`Self::parse`].
    pub fn configured(url: &str) -> Result<Self, GuardError> {
        Self::parse(&AllowEntry {
            url: url.to_string(),
            allow_private: true,
        })
    }

    fn covers(&self, url: &reqwest::Url, host: &str) -> bool {
        let path = url.path();
        self.scheme == url.scheme()
            && self.host == host
            && Some(self.port) == url.port_or_known_default()
            && (self.path.is_empty()
                || path == self.path
                || path
                    .strip_prefix(&self.path)
                    .is_some_and(|rest| rest.starts_with('/')))
    }
}

/// Credentials, query strings and fragments have no place in a destination's base URL.
fn check_shape(url: &reqwest::Url) -> Result<(), GuardError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(GuardError::BadUrl(format!(
            "{url}: only http:// and https:// are called"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(GuardError::BadUrl(format!("{url}: credentials in the URL")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(GuardError::BadUrl(format!(
            "{url}: a query or fragment in a base URL"
        )));
    }
    Ok(())
}

/// The host in lower case (IPv6 without brackets).
fn host_of(url: &reqwest::Url) -> Result<String, GuardError> {
    match url.host() {
        Some(url::Host::Domain(d)) => Ok(d.trim_end_matches('.').to_ascii_lowercase()),
        Some(url::Host::Ipv4(a)) => Ok(a.to_string()),
        Some(url::Host::Ipv6(a)) => Ok(a.to_string()),
        None => Err(GuardError::BadUrl(format!("{url}: no host"))),
    }
}

/// The allow-list.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    entries: Vec<Allowed>,
}

impl AllowList {
    /// From parsed entries.
    pub fn new(entries: Vec<Allowed>) -> Self {
        Self { entries }
    }

    /// Adds an entry.
    pub fn push(&mut self, entry: Allowed) {
        self.entries.push(entry);
    }

    /// The entry that allows `url`, checked for shape (no credentials, http(s) only). A query
    /// is allowed on the request URL (not on base URLs); the path must not climb with `..`
    /// (the URL parser has already removed dot segments, so a `..` cannot escape a prefix).
    ///
    /// # Errors
    /// [`GuardError`] when the URL is malformed or no entry covers it.
    pub fn check(&self, url: &reqwest::Url) -> Result<&Allowed, GuardError> {
        if !matches!(url.scheme(), "http" | "https")
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(GuardError::BadUrl(url.to_string()));
        }
        let host = host_of(url)?;
        self.entries
            .iter()
            .find(|e| e.covers(url, &host))
            .ok_or_else(|| GuardError::NotAllowed(redact(url)))
    }

    /// Whether non-public addresses are allowed for `host` (some entry for it says so).
    pub fn private_ok(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.entries
            .iter()
            .any(|e| e.allow_private && e.host == host)
    }
}

/// A URL as it may appear in an error: scheme, host, port and path, no query.
pub fn redact(url: &reqwest::Url) -> String {
    format!(
        "{}://{}{}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port().map(|p| format!(":{p}")).unwrap_or_default(),
        url.path()
    )
}

/// Whether `ip` is a public unicast address. Refused otherwise: unspecified, loopback,
/// private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16, fe80::/10, where
/// cloud metadata services live), shared (100.64/10), benchmarking, documentation, multicast,
/// broadcast and reserved ranges, and IPv4-mapped/compatible forms of those.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            is_public_v6(a)
        }
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_multicast()
        || a.is_broadcast()
        || a.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || o[0] >= 240)
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0)
        || (s[0] == 0x0064 && s[1] == 0xff9b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[(&str, bool)]) -> AllowList {
        AllowList::new(
            entries
                .iter()
                .map(|(u, p)| {
                    Allowed::parse(&AllowEntry {
                        url: (*u).to_string(),
                        allow_private: *p,
                    })
                    .unwrap()
                })
                .collect(),
        )
    }

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn prefixes_match_scheme_host_port_and_whole_segments() {
        let l = list(&[("http://pacs.example:8042/dicom-web", false)]);
        assert!(l
            .check(&url("http://pacs.example:8042/dicom-web/studies/1"))
            .is_ok());
        assert!(l.check(&url("http://PACS.example:8042/dicom-web")).is_ok());
        for bad in [
            "http://pacs.example:8043/dicom-web/studies",
            "https://pacs.example:8042/dicom-web/studies",
            "http://pacs.example:8042/dicom-webx/studies",
            "http://pacs.example:8042/other",
            "http://pacs.example:8042/dicom-web/../admin",
            "http://pacs.example.evil:8042/dicom-web",
            "http://user:pw@pacs.example:8042/dicom-web",
            "ftp://pacs.example:8042/dicom-web",
        ] {
            assert!(l.check(&url(bad)).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn base_urls_with_queries_fragments_or_credentials_are_refused() {
        for bad in [
            "http://a.example/x?y=1",
            "http://a.example/x#f",
            "http://u@a.example/",
            "file:///etc/passwd",
            "gopher://a.example/",
        ] {
            assert!(Allowed::configured(bad).is_err(), "{bad} is not a base URL");
        }
    }

    #[test]
    fn non_public_addresses_are_recognised() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a} is not public");
        }
        for a in ["8.8.8.8", "151.101.1.1", "2606:4700::1111"] {
            assert!(is_public(a.parse().unwrap()), "{a} is public");
        }
    }
}
