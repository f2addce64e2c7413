//! Throttling of failed authentication, per claimed identity and per source address.
//!
//! Every refused credential (a wrong password, an unknown user, a bad token) counts one
//! failure against the user name it claimed, if any, and against the client's address
//! (an IPv6 client by its /64, which it commonly holds whole). When a key collects
//! `max_failures` within `window`, it is locked for `lockout`, doubled for every further
//! failure up to `max_lockout`; while locked, requests with credentials get `429
//! TOOMANYREQUESTS` with `Retry-After`, before any password is checked (so guessing
//! costs the attacker time and the registry no bcrypt). A success clears the
//! identity's count; the address's count only ages out, so that one valid account does
//! not unlock guessing at others from the same address.
//!
//! Memory is bounded: at most [`MAX_KEYS`] keys are tracked; beyond it, keys without
//! a recent failure are forgotten first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked at most.
pub(crate) const MAX_KEYS: usize = 65_536;

/// Limits on failed authentication. [`Default`]: 10 failures per identity and 30 per
/// address within 5 minutes, then 10 seconds of lockout, doubling up to 15 minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures of one claimed identity (user name) before it is locked.
    pub max_failures_per_identity: u32,
    /// Failures from one address before it is locked.
    pub max_failures_per_address: u32,
    /// Failures older than this are forgotten.
    pub window: Duration,
    /// The first lockout; each further failure doubles it.
    pub lockout: Duration,
    /// The longest lockout.
    pub max_lockout: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            max_failures_per_identity: 10,
            max_failures_per_address: 30,
            window: Duration::from_secs(300),
            lockout: Duration::from_secs(10),
            max_lockout: Duration::from_secs(900),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Identity(String),
    Address(IpAddr),
}

struct Entry {
    failures: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Why a request is held back: which key is locked, and for how long still.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Locked {
    /// `identity` or `address`.
    pub(crate) by: &'static str,
    pub(crate) retry_after: Duration,
}

pub(crate) struct Throttle {
    config: ThrottleConfig,
    entries: Mutex<HashMap<Key, Entry>>,
}

fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(ip) => IpAddr::V4(ip),
        IpAddr::V6(ip) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(ip) & !((1u128 << 64) - 1),
        )),
    }
}

fn keys(identity: Option<&str>, addr: Option<IpAddr>) -> impl Iterator<Item = Key> {
    identity
        .filter(|n| !n.is_empty())
        .map(|n| Key::Identity(n.to_owned()))
        .into_iter()
        .chain(addr.map(|a| Key::Address(network(a))))
}

impl Throttle {
    pub(crate) fn new(config: ThrottleConfig) -> Self {
        Throttle {
            config,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request claiming `identity` from `addr` must wait, and how long.
    pub(crate) fn check(&self, identity: Option<&str>, addr: Option<IpAddr>) -> Option<Locked> {
        let now = Instant::now();
        let entries = self.lock();
        keys(identity, addr)
            .filter_map(|k| {
                let until = entries.get(&k)?.locked_until?;
                (until > now).then(|| Locked {
                    by: match k {
                        Key::Identity(_) => "identity",
                        Key::Address(_) => "address",
                    },
                    retry_after: until - now,
                })
            })
            .max_by_key(|l| l.retry_after)
    }

    /// Counts a refused credential.
    pub(crate) fn failed(&self, identity: Option<&str>, addr: Option<IpAddr>) {
        let now = Instant::now();
        let mut entries = self.lock();
        if entries.len() >= MAX_KEYS {
            let window = self.config.window;
            entries.retain(|_, e| {
                now.duration_since(e.last) < window || e.locked_until.is_some_and(|u| u > now)
            });
        }
        for key in keys(identity, addr) {
            let max = match key {
                Key::Identity(_) => self.config.max_failures_per_identity,
                Key::Address(_) => self.config.max_failures_per_address,
            };
            if entries.len() >= MAX_KEYS && !entries.contains_key(&key) {
                continue;
            }
            let e = entries.entry(key).or_insert(Entry {
                failures: 0,
                last: now,
                locked_until: None,
            });
            if now.duration_since(e.last) >= self.config.window {
                e.failures = 0;
            }
            e.failures = e.failures.saturating_add(1);
            e.last = now;
            if max > 0 && e.failures >= max {
                let doublings = (e.failures - max).min(20);
                let lockout = self
                    .config
                    .lockout
                    .saturating_mul(1 << doublings)
                    .min(self.config.max_lockout);
                e.locked_until = Some(now + lockout);
            }
        }
    }

    /// Clears the count of an identity that authenticated.
    pub(crate) fn succeeded(&self, identity: Option<&str>) {
        if let Some(name) = identity {
            self.lock().remove(&Key::Identity(name.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(per_identity: u32, per_address: u32) -> Throttle {
        Throttle::new(ThrottleConfig {
            max_failures_per_identity: per_identity,
            max_failures_per_address: per_address,
            window: Duration::from_secs(3600),
            lockout: Duration::from_secs(60),
            max_lockout: Duration::from_secs(600),
        })
    }

    #[test]
    fn identities_lock_after_the_limit_and_unlock_on_success() {
        let t = throttle(3, 100);
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..2 {
            t.failed(Some("alice"), Some(addr));
            assert_eq!(t.check(Some("alice"), Some(addr)), None);
        }
        t.failed(Some("alice"), Some(addr));
        let locked = t.check(Some("alice"), Some(addr)).unwrap();
        assert_eq!(locked.by, "identity");
        assert!(locked.retry_after <= Duration::from_secs(60));
        assert!(locked.retry_after > Duration::from_secs(50));
        // Another name from the same address is not locked; the same name elsewhere is.
        assert_eq!(t.check(Some("bob"), Some(addr)), None);
        assert!(t.check(Some("alice"), None).is_some());
        // Each further failure doubles the lockout, up to the maximum.
        t.failed(Some("alice"), None);
        assert!(t.check(Some("alice"), None).unwrap().retry_after > Duration::from_secs(110));
        for _ in 0..10 {
            t.failed(Some("alice"), None);
        }
        assert!(t.check(Some("alice"), None).unwrap().retry_after <= Duration::from_secs(600));
        t.succeeded(Some("alice"));
        assert_eq!(t.check(Some("alice"), None), None);
    }

    #[test]
    fn addresses_lock_by_network() {
        let t = throttle(100, 2);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        t.failed(None, Some(a));
        t.failed(Some("x"), Some(b));
        assert_eq!(t.check(None, Some(a)).unwrap().by, "address");
        assert_eq!(t.check(Some("y"), Some(b)).unwrap().by, "address");
        assert_eq!(t.check(None, Some(c)), None, "another /64");
        // A success does not unlock the address.
        t.succeeded(Some("x"));
        assert!(t.check(None, Some(a)).is_some());
    }

    #[test]
    fn zero_disables_a_limit() {
        let t = throttle(0, 0);
        for _ in 0..50 {
            t.failed(Some("alice"), Some("192.0.2.1".parse().unwrap()));
        }
        assert_eq!(
            t.check(Some("alice"), Some("192.0.2.1".parse().unwrap())),
            None
        );
    }
}
