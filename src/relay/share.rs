//! One notion of a share of a pool, used by every pool a stranger or a tenant can fill:
//! handshakes, a tunnel's and an agent's connections, agent sessions, raw TCP ports and
//! leases. Sans-IO: no clock, no tasks; the owner of a place acts on the answers.
//!
//! A pool has a capacity and places held by holders at two levels: a *holder* (a source
//! address — an IPv4 address or an IPv6 /48 — or a token) and, within it, a *member* (an
//! IPv6 /64, or an agent). While places are free, anyone takes one, except that a pool
//! of known holders (tokens) keeps each of them its share, `capacity / holders`, until
//! it uses it. At the limit, a newcomer takes a place back from the holder of the most
//! if, with it, it still holds fewer than that holder did; within its own holder, from
//! the member of the most on the same terms. So a holder never keeps more than others
//! while they wait: shares even out under pressure, no first-come flood locks anyone
//! out, and two holders never take the same place back and forth.
//!
//! The place taken back is a *yielding* place (a handshake past its first deadline, a
//! lease of an agent that is away) of any holder that holds more, the richest first,
//! else — in pools whose places can be taken back at any time ([`TakeBack::Any`]) — the
//! oldest place of the holder of the most.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

/// A place in a pool; numbers grow with time, so a smaller one is older.
pub(crate) type PlaceId = u64;

/// Which places may be taken back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TakeBack {
    /// Any place: the victim's yielding places first, then its oldest.
    Any,
    /// Only yielding places (a live tunnel's lease is never taken).
    Yielding,
}

/// What a pool answers to a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A free place.
    Taken(PlaceId),
    /// A place taken back from `from`, already released here; its owner must give it up.
    TakenBack {
        /// The newcomer's place.
        place: PlaceId,
        /// The place taken back.
        from: PlaceId,
    },
    /// No place: the newcomer holds as much as anyone it could take from.
    Refused,
}

/// The places of one holder, or of one member.
#[derive(Debug, Default)]
struct Held {
    places: BTreeSet<PlaceId>,
    yielding: BTreeSet<PlaceId>,
}

impl Held {
    fn count(&self) -> usize {
        self.places.len()
    }

    /// The place to take back from the first of `candidates` (richest first) that has
    /// one: the oldest yielding place of any of them, else, if `take_back` allows, the
    /// oldest place of the first.
    fn first_victim<'a>(
        candidates: impl Iterator<Item = &'a Held> + Clone,
        take_back: TakeBack,
    ) -> Option<PlaceId> {
        let mut yielding = candidates.clone().filter_map(|held| held.yielding.first());
        if let Some(&id) = yielding.next() {
            return Some(id);
        }
        match take_back {
            TakeBack::Any => candidates
                .filter_map(|held| held.places.first())
                .next()
                .copied(),
            TakeBack::Yielding => None,
        }
    }

    fn insert(&mut self, id: PlaceId) {
        self.places.insert(id);
    }

    fn remove(&mut self, id: PlaceId) {
        self.places.remove(&id);
        self.yielding.remove(&id);
    }
}

/// A holder's places and those of each of its members.
#[derive(Debug)]
struct Holder<M> {
    all: Held,
    members: HashMap<M, Held>,
}

impl<M> Default for Holder<M> {
    fn default() -> Self {
        Holder {
            all: Held::default(),
            members: HashMap::new(),
        }
    }
}

/// A pool of places shared between holders `H` with members `M`.
#[derive(Debug)]
pub(crate) struct Shares<H, M> {
    capacity: usize,
    take_back: TakeBack,
    /// Places kept for each known holder until it uses them (0: none kept).
    share: usize,
    /// How many known holders there are (0: holders are not known in advance).
    known: usize,
    /// The most places one holder may hold.
    cap: usize,
    /// Places of known holders counted towards their share: `Σ min(count, share)`.
    met: usize,
    next: PlaceId,
    places: HashMap<PlaceId, (H, M)>,
    holders: HashMap<H, Holder<M>>,
    /// Holders by how many places they hold, the most last.
    by_count: BTreeSet<(usize, H)>,
}

impl<H, M> Shares<H, M>
where
    H: Copy + Ord + Hash,
    M: Copy + Eq + Hash,
{
    /// A pool of `capacity` places of unknown holders.
    pub(crate) fn new(capacity: usize, take_back: TakeBack) -> Self {
        Self::with_known(capacity, take_back, 0)
    }

    /// A pool of `capacity` places, each of `known` holders kept a share of
    /// `capacity / known` until it uses it.
    pub(crate) fn with_known(capacity: usize, take_back: TakeBack, known: usize) -> Self {
        Shares {
            capacity,
            take_back,
            share: capacity.checked_div(known).unwrap_or(0),
            known,
            cap: capacity,
            met: 0,
            next: 0,
            places: HashMap::new(),
            holders: HashMap::new(),
            by_count: BTreeSet::new(),
        }
    }

    /// The same pool, where one holder may hold at most `cap` places.
    pub(crate) fn with_cap(mut self, cap: usize) -> Self {
        self.cap = cap;
        self
    }

    /// Whether [`admit`](Self::admit) would give `member` of `holder` a place now.
    pub(crate) fn would_admit(&self, holder: H, member: M) -> bool {
        self.may_take_free(holder) || self.victim(holder, member).is_some()
    }

    /// Whether `holder` holds as many places as one holder may.
    pub(crate) fn at_cap(&self, holder: H) -> bool {
        self.held_by(holder) >= self.cap
    }

    /// Places held now.
    pub(crate) fn in_use(&self) -> usize {
        self.places.len()
    }

    /// Places `holder` holds now.
    pub(crate) fn held_by(&self, holder: H) -> usize {
        self.holders.get(&holder).map_or(0, |h| h.all.count())
    }

    /// Admits a newcomer of `member` of `holder`: a free place, a place taken back, or
    /// a refusal (see the module's docs).
    pub(crate) fn admit(&mut self, holder: H, member: M) -> Admission {
        if self.may_take_free(holder) {
            return Admission::Taken(self.take(holder, member));
        }
        match self.victim(holder, member) {
            Some(from) => {
                self.release(from);
                let place = self.take(holder, member);
                Admission::TakenBack { place, from }
            }
            None => Admission::Refused,
        }
    }

    /// Gives a place back (nothing if it is not held).
    pub(crate) fn release(&mut self, id: PlaceId) {
        let Some((holder, member)) = self.places.remove(&id) else {
            return;
        };
        let Some(entry) = self.holders.get_mut(&holder) else {
            return;
        };
        let before = entry.all.count();
        entry.all.remove(id);
        if let Some(held) = entry.members.get_mut(&member) {
            held.remove(id);
            if held.count() == 0 {
                entry.members.remove(&member);
            }
        }
        let after = entry.all.count();
        if after == 0 {
            self.holders.remove(&holder);
        }
        self.recount(holder, before, after);
    }

    /// Marks a place as one to give back first (or no longer).
    pub(crate) fn set_yielding(&mut self, id: PlaceId, yielding: bool) {
        let Some(&(holder, member)) = self.places.get(&id) else {
            return;
        };
        let Some(entry) = self.holders.get_mut(&holder) else {
            return;
        };
        let held = [Some(&mut entry.all), entry.members.get_mut(&member)];
        for held in held.into_iter().flatten() {
            if yielding {
                held.yielding.insert(id);
            } else {
                held.yielding.remove(&id);
            }
        }
    }

    /// Whether `holder` may take a free place: one is free, and taking it leaves free
    /// places for every other known holder's unused share.
    fn may_take_free(&self, holder: H) -> bool {
        let free = self.capacity.saturating_sub(self.in_use());
        if free == 0 {
            return false;
        }
        let own = self.held_by(holder);
        if own >= self.cap {
            return false;
        }
        if self.known == 0 || own < self.share {
            return true;
        }
        let kept_for_others = self.known * self.share - self.met;
        free > kept_for_others
    }

    /// The place to take back for a newcomer of `member` of `holder`, if any: from the
    /// holders that hold more than `holder` will with the place (a yielding place of any
    /// of them first, else the oldest of the richest), else likewise from the members of
    /// `holder` that hold more than `member` will.
    fn victim(&self, holder: H, member: M) -> Option<PlaceId> {
        let own = self.held_by(holder);
        if own < self.cap {
            let richer = self
                .by_count
                .iter()
                .rev()
                .take_while(|(count, _)| *count > own + 1)
                .filter(|(_, other)| *other != holder)
                .map(|(_, other)| &self.holders[other].all);
            if let Some(id) = Held::first_victim(richer, self.take_back) {
                return Some(id);
            }
        }
        let entry = self.holders.get(&holder)?;
        let own_member = entry.members.get(&member).map_or(0, Held::count);
        let mut richer: Vec<&Held> = entry
            .members
            .iter()
            .filter(|(m, held)| **m != member && held.count() > own_member + 1)
            .map(|(_, held)| held)
            .collect();
        richer.sort_by_key(|held| std::cmp::Reverse(held.count()));
        Held::first_victim(richer.into_iter(), self.take_back)
    }

    fn take(&mut self, holder: H, member: M) -> PlaceId {
        let id = self.next;
        self.next += 1;
        self.places.insert(id, (holder, member));
        let entry = self.holders.entry(holder).or_default();
        let before = entry.all.count();
        entry.all.insert(id);
        entry.members.entry(member).or_default().insert(id);
        self.recount(holder, before, before + 1);
        id
    }

    /// Keeps `by_count` and `met` in step with a holder's count going from `before` to
    /// `after`.
    fn recount(&mut self, holder: H, before: usize, after: usize) {
        if before > 0 {
            self.by_count.remove(&(before, holder));
        }
        if after > 0 {
            self.by_count.insert((after, holder));
        }
        if self.known > 0 {
            self.met = self.met + after.min(self.share) - before.min(self.share);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes a place, failing the test on a refusal.
    fn take(pool: &mut Shares<u8, u8>, holder: u8, member: u8) -> PlaceId {
        match pool.admit(holder, member) {
            Admission::Taken(id) | Admission::TakenBack { place: id, .. } => id,
            Admission::Refused => panic!("{holder}/{member} refused"),
        }
    }

    #[test]
    fn at_the_limit_the_holder_of_the_most_gives_back_its_oldest_place() {
        let mut pool = Shares::new(4, TakeBack::Any);
        let flood: Vec<_> = (0..4).map(|_| take(&mut pool, 1, 0)).collect();
        // The flooder cannot take from itself.
        assert_eq!(pool.admit(1, 0), Admission::Refused);
        // A newcomer takes its oldest place back, then another, until they are even.
        let Admission::TakenBack { place, from } = pool.admit(2, 0) else {
            panic!("not taken back");
        };
        assert_eq!(from, flood[0]);
        assert_eq!(
            pool.admit(2, 0),
            Admission::TakenBack {
                place: place + 1,
                from: flood[1]
            }
        );
        assert_eq!((pool.held_by(1), pool.held_by(2)), (2, 2));
        assert_eq!(pool.admit(2, 0), Admission::Refused);
        assert_eq!(pool.admit(1, 0), Admission::Refused);
        // A third holder takes from one of the two richest; nobody takes from it.
        assert!(matches!(pool.admit(3, 0), Admission::TakenBack { .. }));
        assert_eq!(pool.in_use(), 4);
        assert_eq!(pool.held_by(3), 1);
        // The holder it took from now holds one too: it takes nothing back either, so
        // no place goes back and forth.
        assert_eq!(pool.held_by(2), 1);
        assert_eq!(pool.admit(2, 0), Admission::Refused);
        // Releasing frees a place for anyone.
        pool.release(flood[2]);
        assert!(matches!(pool.admit(1, 0), Admission::Taken(_)));
    }

    #[test]
    fn yielding_places_go_first_and_only_they_in_a_yielding_pool() {
        let mut pool = Shares::new(3, TakeBack::Any);
        let ids: Vec<_> = (0..3).map(|_| take(&mut pool, 1, 0)).collect();
        pool.set_yielding(ids[2], true);
        assert_eq!(
            pool.admit(2, 0),
            Admission::TakenBack {
                place: 3,
                from: ids[2]
            }
        );
        let mut leases = Shares::new(2, TakeBack::Yielding);
        let held: Vec<_> = (0..2).map(|_| take(&mut leases, 1, 0)).collect();
        assert_eq!(leases.admit(2, 0), Admission::Refused, "no place yields");
        leases.set_yielding(held[1], true);
        leases.set_yielding(held[1], false);
        assert_eq!(leases.admit(2, 0), Admission::Refused, "no longer yields");
        leases.set_yielding(held[0], true);
        assert!(matches!(leases.admit(2, 0), Admission::TakenBack { from, .. } if from == held[0]));
    }

    #[test]
    fn a_yielding_place_of_any_richer_holder_goes_before_the_richest_ones_oldest() {
        // Holder 1 holds three busy places; holder 2 two, one of them yielding (a
        // handshake past its first deadline): a newcomer takes that one.
        let mut pool = Shares::new(5, TakeBack::Any);
        for _ in 0..3 {
            take(&mut pool, 1, 0);
        }
        take(&mut pool, 2, 0);
        let late = take(&mut pool, 2, 0);
        pool.set_yielding(late, true);
        assert!(matches!(pool.admit(3, 0), Admission::TakenBack { from, .. } if from == late));
        // With none yielding, the richest gives its oldest.
        assert!(matches!(
            pool.admit(4, 0),
            Admission::TakenBack { from: 0, .. }
        ));
    }

    #[test]
    fn within_a_holder_the_member_of_the_most_gives_way() {
        // One /48 (holder 1): a /64 (member 7) floods; another /64 of it gets a place.
        let mut pool = Shares::new(4, TakeBack::Any);
        let flood: Vec<_> = (0..4).map(|_| take(&mut pool, 1, 7)).collect();
        assert_eq!(
            pool.admit(1, 8),
            Admission::TakenBack {
                place: 4,
                from: flood[0]
            }
        );
        take(&mut pool, 1, 8);
        assert_eq!(pool.admit(1, 8), Admission::Refused, "even now");
        assert_eq!(pool.held_by(1), 4);
    }

    #[test]
    fn known_holders_are_kept_their_share_until_they_use_it() {
        // Two tokens, six places: each is kept three.
        let mut pool = Shares::with_known(6, TakeBack::Yielding, 2);
        for _ in 0..3 {
            take(&mut pool, 0, 0);
        }
        assert_eq!(pool.admit(0, 0), Admission::Refused, "the rest is kept");
        for _ in 0..3 {
            take(&mut pool, 1, 0);
        }
        assert_eq!(pool.admit(1, 0), Admission::Refused);
        // Three tokens, seven places: two each kept, one for whoever comes first.
        let mut pool = Shares::with_known(7, TakeBack::Yielding, 3);
        let first: Vec<_> = (0..3).map(|_| take(&mut pool, 0, 0)).collect();
        assert_eq!(pool.admit(0, 0), Admission::Refused);
        take(&mut pool, 1, 0);
        take(&mut pool, 1, 0);
        assert_eq!(pool.admit(1, 0), Admission::Refused);
        pool.release(first[0]);
        take(&mut pool, 1, 0);
        take(&mut pool, 2, 0);
        take(&mut pool, 2, 0);
        assert_eq!(pool.in_use(), 7);
    }
}
