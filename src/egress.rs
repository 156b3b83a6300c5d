//! Where the operator and its runs may connect: one deny list of address ranges for every
//! outbound connection a spec can aim (HTTP destinations and vendors, `checkUrl`, database
//! sources and destinations, the Warehouse state store, Redis).
//!
//! Addresses are checked after DNS resolution, so a name that resolves (or rebinds) into a
//! denied range is refused too: HTTP clients resolve through [`Resolver`], which drops denied
//! addresses before hyper connects; URLs whose host is an IP literal never reach a resolver
//! and are checked with [`check_host`]; database and Redis hosts are resolved and checked
//! with [`check_endpoint`] before the driver connects (the driver resolves again, so a name
//! that rebinds between the two lookups is left to the chart's NetworkPolicy).
//!
//! The policy is process-wide: `backflow operator` and `backflow run` install it once from
//! `--egress-deny` ([`install`]); until then [`Policy::local`] applies.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use ipnet::IpNet;

/// Link-local ranges, where cloud metadata services answer (169.254.169.254).
pub const LINK_LOCAL: [&str; 2] = ["169.254.0.0/16", "fe80::/10"];

/// Loopback ranges: inside a pod, the pod's own containers (sidecars, admin ports).
pub const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// Why a connection was refused or its rules could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// The host is (or resolves only to) an address in a denied range.
    #[error(
        "failed to connect to {host}: its address {address} is in {rule}, which the operator's egress policy denies"
    )]
    Denied {
        /// The host as the spec names it.
        host: String,
        /// The address it resolved to.
        address: IpAddr,
        /// The denied range that holds it.
        rule: IpNet,
    },
    /// The host name could not be resolved.
    #[error("failed to resolve {host}: {reason}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's reason.
        reason: String,
    },
    /// A rule of `--egress-deny` is not a CIDR.
    #[error(
        "invalid egress rule {0:?}: expected a CIDR such as 10.0.0.0/8, an address, link-local or loopback"
    )]
    InvalidRule(String),
}

impl EgressError {
    /// True for a refusal by the policy (a person must change the spec or the policy).
    pub fn is_denied(&self) -> bool {
        matches!(self, EgressError::Denied { .. })
    }
}

/// The ranges no outbound connection may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    deny: Vec<IpNet>,
}

impl Policy {
    /// A policy denying `deny`.
    pub fn new(deny: Vec<IpNet>) -> Policy {
        Policy { deny }
    }

    /// The default of local runs: link-local only (test doubles and local databases listen
    /// on loopback).
    pub fn local() -> Policy {
        Policy::new(parse_all(&LINK_LOCAL))
    }

    /// The default of the operator: link-local and loopback.
    pub fn cluster() -> Policy {
        Policy::new(parse_all(&[LINK_LOCAL, LOOPBACK].concat()))
    }

    /// Reads rules: CIDRs, bare addresses, and the words `link-local` and `loopback`. Empty
    /// items are skipped, so an empty list denies nothing.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Policy, EgressError> {
        let mut deny = Vec::new();
        for rule in rules.iter().map(|r| r.as_ref().trim()).filter(|r| !r.is_empty()) {
            match rule {
                "link-local" => deny.extend(parse_all(&LINK_LOCAL)),
                "loopback" => deny.extend(parse_all(&LOOPBACK)),
                _ => deny.push(
                    rule.parse::<IpNet>()
                        .or_else(|_| rule.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| EgressError::InvalidRule(rule.to_owned()))?,
                ),
            }
        }
        Ok(Policy::new(deny))
    }

    /// The denied ranges.
    pub fn rules(&self) -> &[IpNet] {
        &self.deny
    }

    /// The rule that denies `address`, if any. An IPv4-mapped IPv6 address is checked as its
    /// IPv4 address, and the unspecified address (which reaches the local host) as loopback.
    pub fn denied_by(&self, address: IpAddr) -> Option<IpNet> {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            v4 => v4,
        };
        let seen_as = match address {
            IpAddr::V4(v4) if v4.is_unspecified() => vec![address, IpAddr::V4(Ipv4Addr::LOCALHOST)],
            IpAddr::V6(v6) if v6.is_unspecified() => vec![address, IpAddr::V6(Ipv6Addr::LOCALHOST)],
            _ => vec![address],
        };
        self.deny
            .iter()
            .find(|rule| seen_as.iter().any(|a| rule.contains(a)))
            .copied()
    }

    /// `Denied` when `address`, which `host` resolved to, is in a denied range.
    pub fn check(&self, host: &str, address: IpAddr) -> Result<(), EgressError> {
        match self.denied_by(address) {
            Some(rule) => Err(EgressError::Denied {
                host: host.to_owned(),
                address,
                rule,
            }),
            None => Ok(()),
        }
    }
}

fn parse_all(rules: &[&str]) -> Vec<IpNet> {
    // The constants above are valid CIDRs; a typo there would deny nothing rather than panic.
    rules.iter().filter_map(|r| r.parse().ok()).collect()
}

static POLICY: RwLock<Option<Arc<Policy>>> = RwLock::new(None);

/// Makes `policy` the process's policy.
pub fn install(policy: Policy) {
    let mut current = POLICY.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    *current = Some(Arc::new(policy));
}

/// The process's policy ([`Policy::local`] until [`install`] is called).
pub fn current() -> Arc<Policy> {
    let installed = POLICY
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    installed.unwrap_or_else(|| Arc::new(Policy::local()))
}

/// The address of `host` when it is an IP literal (`10.0.0.1`, `[fd00::1]`).
fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Checks a host that is an IP literal (names are checked when resolved); `Ok` for names.
pub fn check_host(host: &str) -> Result<(), EgressError> {
    match literal(host) {
        Some(address) => current().check(host, address),
        None => Ok(()),
    }
}

/// Resolves `host:port` and checks every address; `Denied` when any is denied (a database
/// driver would try them all). Returns the addresses.
pub async fn check_endpoint(host: &str, port: u16) -> Result<Vec<SocketAddr>, EgressError> {
    let policy = current();
    let addresses: Vec<SocketAddr> = match literal(host) {
        Some(address) => vec![SocketAddr::new(address, port)],
        None => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| EgressError::Resolve {
                host: host.to_owned(),
                reason: e.to_string(),
            })?
            .collect(),
    };
    for address in &addresses {
        policy.check(host, address.ip())?;
    }
    Ok(addresses)
}

/// The egress refusal somewhere in `error`'s chain of sources, if any.
pub fn find_in<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e EgressError> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<EgressError>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// A DNS resolver for `reqwest` that drops addresses the policy denies, so hyper never
/// connects to them; a name with no allowed address fails with [`EgressError::Denied`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Resolver;

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let policy = current();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| EgressError::Resolve {
                    host: host.clone(),
                    reason: e.to_string(),
                })?
                .collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(&host, a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refusal.get_or_insert(e);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refusal) {
                (true, Some(refusal)) => Err(Box::new(refusal) as _),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The HTTP client builder every connector starts from: DNS through [`Resolver`].
pub fn http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder().dns_resolver(Arc::new(Resolver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_metadata_and_mapped_addresses_are_denied_and_public_ones_are_not() {
        let policy = Policy::cluster();
        let denied = |a: &str| policy.denied_by(a.parse().unwrap()).map(|r| r.to_string());
        assert_eq!(denied("169.254.169.254").as_deref(), Some("169.254.0.0/16"));
        assert_eq!(
            denied("::ffff:169.254.169.254").as_deref(),
            Some("169.254.0.0/16")
        );
        assert_eq!(denied("fe80::1").as_deref(), Some("fe80::/10"));
        assert_eq!(denied("127.0.0.1").as_deref(), Some("127.0.0.0/8"));
        assert_eq!(
            denied("0.0.0.0").as_deref(),
            Some("127.0.0.0/8"),
            "0.0.0.0 reaches the host"
        );
        assert_eq!(denied("93.184.216.34"), None);
        assert_eq!(Policy::local().denied_by("127.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn rules_are_cidrs_addresses_or_names_and_anything_else_is_refused() {
        let policy = Policy::parse(&["10.0.0.0/8", " 127.0.0.2 ", "link-local", ""]).unwrap();
        let rules: Vec<String> = policy.rules().iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            ["10.0.0.0/8", "127.0.0.2/32", "169.254.0.0/16", "fe80::/10"]
        );
        assert_eq!(
            Policy::parse(&["10.0.0.0/33"]),
            Err(EgressError::InvalidRule("10.0.0.0/33".into()))
        );
    }

    #[test]
    fn a_refusal_names_the_host_the_address_and_the_rule() {
        let err = Policy::cluster()
            .check("metadata.internal", "169.254.169.254".parse().unwrap())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to connect to metadata.internal: its address 169.254.169.254 is in \
             169.254.0.0/16, which the operator's egress policy denies"
        );
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(err.clone());
        assert_eq!(find_in(boxed.as_ref()), Some(&err));
    }
}
