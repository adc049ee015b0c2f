//! Pools whose places are held by tasks ([`Pool`]), shared by source address
//! ([`Source`]): a place taken back for a newcomer wakes its holder's task, which gives
//! up its work (closes its connection, ends its session).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::share::{Admission, PlaceId, Shares, TakeBack};
use crate::netstack::lock;

/// Who a connection's places are counted against: its source address at two levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Source {
    /// An IPv4 address (also from a v4-mapped IPv6 address).
    V4([u8; 4]),
    /// An IPv6 /48, usually one site.
    V6([u8; 6]),
    /// A stream with no address ([`RelayHandle::serve_agent_stream`](super::RelayHandle::serve_agent_stream)).
    Unknown,
}

/// Within a [`Source`]: the IPv6 /64 (one host usually has a whole one); the same as
/// the source for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Member([u8; 8]);

impl Source {
    /// The source and member of an address (`None`: a stream with no address).
    pub(crate) fn of(ip: Option<IpAddr>) -> (Source, Member) {
        let v4 = |octets: [u8; 4]| {
            let mut member = [0; 8];
            member[..4].copy_from_slice(&octets);
            (Source::V4(octets), Member(member))
        };
        match ip {
            None => (Source::Unknown, Member([0; 8])),
            Some(IpAddr::V4(v4_addr)) => v4(v4_addr.octets()),
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(mapped) => v4(mapped.octets()),
                None => {
                    let octets = v6.octets();
                    let (mut site, mut host) = ([0; 6], [0; 8]);
                    site.copy_from_slice(&octets[..6]);
                    host.copy_from_slice(&octets[..8]);
                    (Source::V6(site), Member(host))
                }
            },
        }
    }
}

/// The shares of a pool, and the signal of each place's holder.
struct State<H, M> {
    shares: Shares<H, M>,
    signals: HashMap<PlaceId, Arc<Notify>>,
}

/// A pool of places held by tasks; cheap to clone (one pool).
pub(crate) struct Pool<H, M> {
    state: Arc<Mutex<State<H, M>>>,
}

impl<H, M> Clone for Pool<H, M> {
    fn clone(&self) -> Self {
        Pool {
            state: self.state.clone(),
        }
    }
}

/// A pool shared by source address.
pub(crate) type AddressPool = Pool<Source, Member>;

/// A place in an [`AddressPool`].
pub(crate) type AddressPlace = Place<Source, Member>;

/// A raw TCP port's place in the relay's range, held by a token.
pub(crate) type PortPlace = Place<usize, ()>;

impl<H, M> Pool<H, M>
where
    H: Copy + Ord + Hash + Send + 'static,
    M: Copy + Eq + Hash + Send + 'static,
{
    /// A pool of `capacity` places, any of which may be taken back.
    pub(crate) fn new(capacity: usize) -> Self {
        Self::from_shares(Shares::new(capacity, TakeBack::Any))
    }

    /// A pool of `capacity` places, each of `known` holders kept its share.
    pub(crate) fn with_known(capacity: usize, known: usize) -> Self {
        Self::from_shares(Shares::with_known(capacity, TakeBack::Any, known))
    }

    /// A pool of `capacity` places, each of `known` holders kept its share, whose
    /// places are never taken back.
    pub(crate) fn reserving(capacity: usize, known: usize) -> Self {
        Self::from_shares(Shares::with_known(capacity, TakeBack::Yielding, known))
    }

    fn from_shares(shares: Shares<H, M>) -> Self {
        Pool {
            state: Arc::new(Mutex::new(State {
                shares,
                signals: HashMap::new(),
            })),
        }
    }

    /// A place for `member` of `holder`, taking one back from another if it must;
    /// `None` if refused.
    pub(crate) fn admit(&self, holder: H, member: M) -> Option<Place<H, M>> {
        let mut state = lock(&self.state);
        let id = match state.shares.admit(holder, member) {
            Admission::Taken(id) => id,
            Admission::TakenBack { place, from } => {
                if let Some(signal) = state.signals.remove(&from) {
                    signal.notify_one();
                }
                place
            }
            Admission::Refused => return None,
        };
        let signal = Arc::new(Notify::new());
        state.signals.insert(id, signal.clone());
        Some(Place {
            pool: self.clone(),
            id,
            signal,
        })
    }

    /// Places held now.
    pub(crate) fn in_use(&self) -> usize {
        lock(&self.state).shares.in_use()
    }

    /// Whether [`admit`](Self::admit) would give `member` of `holder` a place now.
    pub(crate) fn would_admit(&self, holder: H, member: M) -> bool {
        lock(&self.state).shares.would_admit(holder, member)
    }
}

impl AddressPool {
    /// A place for a connection from `ip` (`None`: no address).
    pub(crate) fn admit_from(&self, ip: Option<IpAddr>) -> Option<AddressPlace> {
        let (source, member) = Source::of(ip);
        self.admit(source, member)
    }

    /// Whether [`admit_from`](Self::admit_from) would give `ip` a place now.
    pub(crate) fn would_admit_from(&self, ip: Option<IpAddr>) -> bool {
        let (source, member) = Source::of(ip);
        self.would_admit(source, member)
    }
}

/// A place in a [`Pool`], given back when dropped.
pub(crate) struct Place<H, M>
where
    H: Copy + Ord + Hash + Send + 'static,
    M: Copy + Eq + Hash + Send + 'static,
{
    pool: Pool<H, M>,
    id: PlaceId,
    signal: Arc<Notify>,
}

impl<H, M> Place<H, M>
where
    H: Copy + Ord + Hash + Send + 'static,
    M: Copy + Eq + Hash + Send + 'static,
{
    /// Completes once the place is taken back for a newcomer: its holder should give
    /// up what it holds the place for.
    pub(crate) fn taken_back(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let signal = self.signal.clone();
        async move { signal.notified().await }
    }

    /// Runs `step` while holding the place, marking the place yielding once `step` has
    /// taken `patience`; `None` if the place is taken back first.
    pub(crate) async fn run<T>(
        &self,
        patience: Duration,
        step: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let impatient = async {
            tokio::time::sleep(patience).await;
            self.set_yielding(true);
            std::future::pending::<()>().await
        };
        tokio::select! {
            out = step => Some(out),
            () = self.taken_back() => None,
            () = impatient => None,
        }
    }

    /// Marks the place as one to take back first (or no longer).
    pub(crate) fn set_yielding(&self, yielding: bool) {
        lock(&self.pool.state)
            .shares
            .set_yielding(self.id, yielding);
    }
}

impl<H, M> Drop for Place<H, M>
where
    H: Copy + Ord + Hash + Send + 'static,
    M: Copy + Eq + Hash + Send + 'static,
{
    fn drop(&mut self) {
        let mut state = lock(&self.pool.state);
        state.shares.release(self.id);
        state.signals.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_count_ipv6_by_site_and_host_and_mapped_addresses_as_ipv4() {
        let ip = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.1")),
            Source::of(ip("192.0.2.1"))
        );
        let (site_a, host_a) = Source::of(ip("2001:db8:1:2::1"));
        let (site_b, host_b) = Source::of(ip("2001:db8:1:2::2"));
        let (site_c, host_c) = Source::of(ip("2001:db8:1:3::1"));
        assert_eq!((site_a, host_a), (site_b, host_b), "one /64");
        assert_eq!(site_a, site_c, "one /48");
        assert_ne!(host_a, host_c);
        assert_ne!(Source::of(ip("2001:db8:2::1")).0, site_a);
    }

    #[tokio::test]
    async fn a_place_taken_back_wakes_its_holder_and_a_dropped_one_is_free() {
        let pool = AddressPool::new(2);
        let flooder: IpAddr = "192.0.2.1".parse().unwrap();
        let held = pool.admit_from(Some(flooder)).unwrap();
        let _newer = pool.admit_from(Some(flooder)).unwrap();
        assert!(pool.admit_from(Some(flooder)).is_none());
        let newcomer = pool.admit_from(Some("192.0.2.2".parse().unwrap())).unwrap();
        held.taken_back().await;
        assert_eq!(pool.in_use(), 2);
        drop(held);
        assert_eq!(pool.in_use(), 2, "its place was already given back");
        drop(newcomer);
        assert_eq!(pool.in_use(), 1);
        assert!(pool.admit_from(None).is_some());
    }
}
