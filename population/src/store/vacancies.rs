//! Vacancies: how the population keeps its size through crashes, preemptions and stops.
//!
//! A reproduction kills before it trains (§3.1), so for a while the loser's place is empty.
//! A worker that dies in that while must not shrink the population for good. Each place being
//! filled, an initial slot or a killed individual's place, is a [`Vacancy`] with a lease
//! (`holes/…`), written *before* the create-only claim that opens it (the slot claim or the
//! tombstone) and renewed while the child trains; the child goes in with a create-only
//! `filled/<vacancy>`. So:
//!
//! - a lease that expires belongs to a worker that is gone (or stalled): any worker adopts
//!   the vacancy and fills it with a child of its own;
//! - however many workers fill one vacancy, one child gets in (the fill is create-only); the
//!   others discard theirs;
//! - a crash between the fill and the alive key is rolled forward by whoever adopts the
//!   lease ([`Population::settle`]);
//! - a lease whose claim was never made (the worker died before it, or lost the claim) opens
//!   nothing and is dropped.
//!
//! Leases compare deadlines written by one machine's clock with another's: clocks must agree
//! to well within [`CLOCK_SKEW`], as NTP-synchronised nodes do.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use rand::seq::IndexedRandom;
use rand::Rng;

use super::layout::{
    record_key, ticket_key, weights_key, AliveEntry, Lease, Vacancy, CONTROL, HOLES, INDIVIDUALS,
    TICKETS,
};
use super::population::Claim;
use super::{Population, StoreError};
use crate::individual::{now_ms, IndividualId};

/// How far past its deadline a lease must be before another worker adopts its vacancy: the
/// clock difference between machines that leases tolerate.
pub const CLOCK_SKEW: Duration = Duration::from_secs(15);

/// What a vacancy's claims say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VacancyState {
    /// Never opened: the slot was not claimed, or the individual was not killed.
    Closed,
    /// Opened and not yet filled.
    Open,
    /// Filled by this child.
    Filled(IndividualId),
}

/// What a sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Alive keys of individuals that had been killed (a killer crashed before removing them).
    pub zombies: usize,
    /// Children whose records or weights were written but who never became alive.
    pub orphans: usize,
}

/// The health of a population: what faults could have left behind. A healthy one that is
/// not running has as many alive as its size and nothing else in any field but `dead`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    pub alive: usize,
    pub dead: usize,
    /// Alive keys of killed individuals.
    pub zombies: Vec<IndividualId>,
    /// Alive keys without a readable record.
    pub broken: Vec<IndividualId>,
    pub leases: usize,
    /// Opened vacancies (killed individuals' places, claimed slots) that no child filled.
    pub unfilled: Vec<Vacancy>,
    /// Children with objects that are neither alive nor dead nor named by a lease.
    pub orphans: Vec<IndividualId>,
}

/// The vacancies whose every lease has expired (or belongs to `me`, a previous run of this
/// worker: a worker holds nothing while it looks), each with its expired leases.
pub fn adoptable(
    leases: &[Lease],
    me: &str,
    now: u64,
    skew: Duration,
) -> Vec<(Vacancy, Vec<Lease>)> {
    let mut by_vacancy: HashMap<&Vacancy, Vec<&Lease>> = HashMap::new();
    for lease in leases {
        by_vacancy.entry(&lease.vacancy).or_default().push(lease);
    }
    let skew = skew.as_millis() as u64;
    let mut out: Vec<(Vacancy, Vec<Lease>)> = by_vacancy
        .into_iter()
        .filter(|(_, held)| {
            held.iter()
                .all(|l| l.worker == me || l.deadline_ms.saturating_add(skew) < now)
        })
        .map(|(v, held)| (v.clone(), held.into_iter().cloned().collect()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

impl Population {
    /// Finishes a revival that a crash interrupted: a vacancy that never opened, whose
    /// individual has a record but is neither alive nor dead, gets its alive key back.
    pub async fn restore_if_lost(
        &self,
        vacancy: &Vacancy,
        alive: &[AliveEntry],
    ) -> Result<(), StoreError> {
        let Vacancy::Replacing(id) = vacancy else {
            return Ok(());
        };
        if alive.iter().any(|a| a.id == *id) || self.is_dead(id).await? {
            return Ok(());
        }
        if let Ok(Some(record)) = self.individual(id).await {
            tracing::info!(store = self.url(), id = %id, "finishing an interrupted revival");
            self.store()
                .put(&Self::alive_entry(&record).key(), Bytes::new())
                .await?;
        }
        Ok(())
    }

    /// Claims the sweep of period `epoch` (a count of sweep intervals): one worker sweeps per
    /// period, however many there are. Claims of past periods are removed.
    pub async fn claim_sweep(&self, epoch: u64, worker: &str) -> Result<bool, StoreError> {
        let key = format!("{CONTROL}sweep.{epoch}");
        if !self
            .store()
            .put_new(&key, Claim::new(worker).body())
            .await?
        {
            return Ok(false);
        }
        for old in self.store().list(CONTROL).await? {
            let past = old
                .strip_prefix(CONTROL)
                .and_then(|k| k.strip_prefix("sweep."))
                .and_then(|e| e.parse::<u64>().ok())
                .is_some_and(|e| e < epoch);
            if past {
                self.store().delete(&old).await?;
            }
        }
        Ok(true)
    }

    /// Every lease on a vacancy, from one LIST.
    pub async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let mut leases = Vec::new();
        for key in self.store().list(HOLES).await? {
            match Lease::parse(&key) {
                Some(lease) => leases.push(lease),
                None => self.skip_foreign(&key, "not a lease"),
            }
        }
        Ok(leases)
    }

    pub async fn hold(&self, lease: &Lease) -> Result<(), StoreError> {
        self.store().put(&lease.key(), Bytes::new()).await
    }

    /// Moves `lease`'s deadline to `deadline_ms`: the new key first, so that the vacancy is
    /// never without a live lease.
    pub async fn renew(&self, lease: &mut Lease, deadline_ms: u64) -> Result<(), StoreError> {
        let old = lease.key();
        lease.deadline_ms = deadline_ms;
        self.hold(lease).await?;
        self.store().delete(&old).await
    }

    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.store().delete(&lease.key()).await
    }

    pub async fn vacancy_state(&self, vacancy: &Vacancy) -> Result<VacancyState, StoreError> {
        if let Some(child) = self.filled_by(vacancy).await? {
            return Ok(VacancyState::Filled(child));
        }
        let opened = match vacancy {
            Vacancy::Slot(k) => self.slot_claimed(*k).await?,
            Vacancy::Replacing(id) => self.is_dead(id).await?,
        };
        Ok(if opened {
            VacancyState::Open
        } else {
            VacancyState::Closed
        })
    }

    /// Finishes what a worker that crashed after filling `vacancy` with `child` left undone:
    /// the child's alive key, the removal of the killed individual's alive key (a zombie), and
    /// the collection of its weights. Idempotent: several adopters may do it at once.
    pub async fn settle(
        &self,
        vacancy: &Vacancy,
        child: &IndividualId,
        alive: &[AliveEntry],
    ) -> Result<(), StoreError> {
        if !alive.iter().any(|a| a.id == *child) && !self.is_dead(child).await? {
            match self.individual(child).await {
                Ok(Some(record)) => {
                    self.store()
                        .put(&Self::alive_entry(&record).key(), Bytes::new())
                        .await?
                }
                Ok(None) => {
                    tracing::warn!(store = self.url(), vacancy = %vacancy, child = %child, "the child that filled a vacancy has no record")
                }
                Err(e @ StoreError::Corrupt { .. }) => {
                    tracing::warn!(store = self.url(), vacancy = %vacancy, error = %e, "the child that filled a vacancy is unreadable")
                }
                Err(e) => return Err(e),
            }
        }
        if let Vacancy::Replacing(victim) = vacancy {
            self.bury(victim, alive).await?;
        }
        Ok(())
    }

    /// Removes what is left of a killed individual besides its record: its alive key, if a
    /// crash left it, and its weights unless they are kept.
    pub async fn bury(
        &self,
        victim: &IndividualId,
        alive: &[AliveEntry],
    ) -> Result<(), StoreError> {
        let entry = match alive.iter().find(|a| a.id == *victim) {
            Some(entry) => {
                self.store().delete(&entry.key()).await?;
                entry.clone()
            }
            None => match self.individual(victim).await {
                Ok(Some(record)) => Self::alive_entry(&record),
                // Without a readable record, keep the weights: losing a best-so-far's
                // weights is worse than keeping a loser's.
                _ => return Ok(()),
            },
        };
        self.collect(&entry).await
    }

    /// Claims one of the first `limit` trainings of a bounded run: its ticket, or `None` when
    /// every one is taken. A bounded run trains exactly `limit` individuals however many
    /// workers share it, because each training holds one ticket (a crashed worker's passes,
    /// with its lease, to whoever fills its vacancy).
    pub async fn claim_ticket(
        &self,
        limit: u64,
        worker: &str,
        rng: &mut impl Rng,
    ) -> Result<Option<u64>, StoreError> {
        loop {
            let taken: HashSet<u64> = self
                .store()
                .list(TICKETS)
                .await?
                .iter()
                .filter_map(|k| k.strip_prefix(TICKETS)?.parse().ok())
                .collect();
            // The lowest few free: a single worker takes them in order, and many workers
            // rarely reach for the same one.
            let free: Vec<u64> = (0..limit).filter(|t| !taken.contains(t)).take(8).collect();
            let Some(&ticket) = free.choose(rng) else {
                return Ok(None);
            };
            if self
                .store()
                .put_new(&ticket_key(ticket), Claim::new(worker).body())
                .await?
            {
                return Ok(Some(ticket));
            }
        }
    }

    pub async fn release_ticket(&self, ticket: u64) -> Result<(), StoreError> {
        self.store().delete(&ticket_key(ticket)).await
    }

    /// Removes zombies (alive keys of killed individuals) and orphans (records and weights of
    /// children that never became alive and that no lease names), once they are older than
    /// `grace`. Lineage records (of individuals that lived) are never touched.
    pub async fn sweep(&self, grace: Duration, skew: Duration) -> Result<Sweep, StoreError> {
        let (alive, dead, leases, keys) = tokio::try_join!(
            self.alive(),
            self.dead(),
            self.leases(),
            self.store().list(INDIVIDUALS)
        )?;
        let now = now_ms();
        let live: HashSet<&Vacancy> = leases
            .iter()
            .filter(|l| l.deadline_ms.saturating_add(skew.as_millis() as u64) >= now)
            .map(|l| &l.vacancy)
            .collect();
        let mut sweep = Sweep::default();
        for entry in alive.iter().filter(|a| dead.contains(&a.id)) {
            if !live.contains(&Vacancy::Replacing(entry.id.clone())) {
                tracing::info!(store = self.url(), id = %entry.id, "removing the alive key of a killed individual");
                self.store().delete(&entry.key()).await?;
                sweep.zombies += 1;
            }
        }
        let alive: HashSet<&IndividualId> = alive.iter().map(|a| &a.id).collect();
        let named: HashSet<&IndividualId> = leases.iter().map(|l| &l.child).collect();
        let grace = grace.as_millis() as u64;
        let orphans: HashSet<IndividualId> = with_objects(&keys)
            .into_iter()
            .filter(|id| {
                id.created_ms()
                    .is_some_and(|t| t.saturating_add(grace) < now)
            })
            .filter(|id| !alive.contains(id) && !dead.contains(id) && !named.contains(id))
            .collect();
        for id in &orphans {
            tracing::info!(store = self.url(), id = %id, "removing a child that never became alive");
            self.store().delete(&record_key(id)).await?;
            self.store().delete(&weights_key(id)).await?;
        }
        sweep.orphans = orphans.len();
        Ok(sweep)
    }

    /// Checks every invariant faults could break, reading every tombstone's fill (one GET
    /// each): for tests and small stores.
    pub async fn audit(&self) -> Result<Audit, StoreError> {
        let (alive, dead, leases, slots, keys) = tokio::try_join!(
            self.alive(),
            self.dead(),
            self.leases(),
            self.claimed_slots(),
            self.store().list(INDIVIDUALS)
        )?;
        let mut audit = Audit {
            alive: alive.len(),
            dead: dead.len(),
            leases: leases.len(),
            ..Audit::default()
        };
        for entry in &alive {
            if dead.contains(&entry.id) {
                audit.zombies.push(entry.id.clone());
            }
            if !matches!(self.individual(&entry.id).await, Ok(Some(_))) {
                audit.broken.push(entry.id.clone());
            }
        }
        let vacancies = slots
            .iter()
            .map(|k| Vacancy::Slot(*k))
            .chain(dead.iter().cloned().map(Vacancy::Replacing));
        for vacancy in vacancies {
            if self.filled_by(&vacancy).await?.is_none() {
                audit.unfilled.push(vacancy);
            }
        }
        let alive: HashSet<&IndividualId> = alive.iter().map(|a| &a.id).collect();
        let named: HashSet<&IndividualId> = leases.iter().map(|l| &l.child).collect();
        audit.orphans = with_objects(&keys)
            .into_iter()
            .filter(|id| !alive.contains(id) && !dead.contains(id) && !named.contains(id))
            .collect();
        audit.orphans.sort();
        audit.unfilled.sort();
        Ok(audit)
    }
}

/// The individuals that have objects among `keys` (a listing of `individuals/`).
fn with_objects(keys: &[String]) -> HashSet<IndividualId> {
    keys.iter()
        .filter_map(|key| {
            let (id, _) = key.strip_prefix(INDIVIDUALS)?.split_once('/')?;
            IndividualId::parse(id).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(vacancy: Vacancy, worker: &str, deadline_ms: u64) -> Lease {
        Lease {
            vacancy,
            worker: worker.into(),
            deadline_ms,
            ticket: None,
            child: IndividualId::new(),
        }
    }

    #[test]
    fn only_vacancies_without_a_live_lease_are_adoptable() {
        let now = 1_000_000;
        let skew = CLOCK_SKEW.as_millis() as u64;
        let expired = now - skew - 1;
        let leases = [
            lease(Vacancy::Slot(0), "a", expired),
            lease(Vacancy::Slot(1), "a", expired),
            lease(Vacancy::Slot(1), "b", now + 5_000),
            lease(Vacancy::Slot(2), "me", now + 60_000),
            lease(Vacancy::Slot(3), "a", now - skew + 1),
        ];
        let found: Vec<Vacancy> = adoptable(&leases, "me", now, CLOCK_SKEW)
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        // Slot 1 has a live lease; slot 3 is within the allowed clock skew; slot 2 is held by
        // a previous run of this very worker.
        assert_eq!(found, vec![Vacancy::Slot(0), Vacancy::Slot(2)]);
    }
}
