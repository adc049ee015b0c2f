//! Places for handshakes in progress, shared fairly between source addresses: one pool
//! for the public port and one for agents, so that a flood of silent connections to one
//! cannot lock the other out, and within each pool no single address (an IPv4 address,
//! or an IPv6 /64, which one host usually has whole) may hold more than half.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::netstack::lock;

/// A pool of handshake places.
pub(crate) struct HandshakeBudget {
    places: Arc<Semaphore>,
    size: usize,
    /// Most places one address may hold.
    per_address: usize,
    held: Held,
}

/// Places held by each address; an address holding none has no entry, so there are at
/// most as many entries as places.
type Held = Arc<Mutex<HashMap<Source, usize>>>;

/// Who a handshake's places are counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    /// The /64 prefix.
    V6([u8; 8]),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let octets = v6.octets();
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&octets[..8]);
                    Source::V6(prefix)
                }
            },
        }
    }
}

/// One handshake's place, given back when dropped.
pub(crate) struct HandshakePermit {
    _place: OwnedSemaphorePermit,
    held: Option<(Held, Source)>,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        if let Some((held, source)) = &self.held {
            let mut held = lock(held);
            if let Some(count) = held.get_mut(source) {
                *count -= 1;
                if *count == 0 {
                    held.remove(source);
                }
            }
        }
    }
}

impl HandshakeBudget {
    /// A pool of `size` places (capped at what tokio supports), of which one address
    /// may hold half, rounded up.
    pub(crate) fn new(size: usize) -> HandshakeBudget {
        let size = size.min(Semaphore::MAX_PERMITS);
        HandshakeBudget {
            places: Arc::new(Semaphore::new(size)),
            size,
            per_address: size.div_ceil(2),
            held: Arc::default(),
        }
    }

    /// A place for a handshake from `from` (`None`: a stream with no address, counted
    /// against the pool only); `None` if the pool, or that address's share, is full.
    pub(crate) fn try_acquire(&self, from: Option<IpAddr>) -> Option<HandshakePermit> {
        let Some(ip) = from else {
            let place = self.places.clone().try_acquire_owned().ok()?;
            return Some(HandshakePermit {
                _place: place,
                held: None,
            });
        };
        let source = Source::of(ip);
        let mut held = lock(&self.held);
        let count = held.get(&source).copied().unwrap_or(0);
        if count >= self.per_address {
            return None;
        }
        let place = self.places.clone().try_acquire_owned().ok()?;
        held.insert(source, count + 1);
        Some(HandshakePermit {
            _place: place,
            held: Some((self.held.clone(), source)),
        })
    }

    /// Places in use.
    pub(crate) fn in_use(&self) -> usize {
        self.size.saturating_sub(self.places.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_half_and_gets_its_places_back() {
        let budget = HandshakeBudget::new(4);
        let flooder: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..2)
            .map(|_| budget.try_acquire(Some(flooder)).unwrap())
            .collect();
        assert!(budget.try_acquire(Some(flooder)).is_none());
        // An IPv6 host counts by its /64; a v4-mapped address as the IPv4 address.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(budget.try_acquire(Some(mapped)).is_none());
        let other = budget.try_acquire(Some(v6a)).unwrap();
        let _last = budget.try_acquire(Some(v6b)).unwrap();
        assert_eq!(budget.in_use(), 4);
        assert!(budget.try_acquire(None).is_none(), "over the pool");
        drop(other);
        assert!(budget.try_acquire(Some(flooder)).is_none());
        drop(held);
        assert_eq!(budget.in_use(), 1);
        assert_eq!(
            lock(&budget.held).len(),
            1,
            "an address holding nothing keeps an entry"
        );
        let _again = budget.try_acquire(Some(flooder)).unwrap();
    }
}
