//! Which membership changes (`ADD_REPLICA`, `REMOVE_REPLICA`) the leader makes.
//!
//! A change is refused (`ERR REJECTED`, nothing changed) unless, after it:
//! - at least one voter is left (never overridable);
//! - it does not shrink the group below [`MIN_SAFE_VOTERS`] voters (a group already below it
//!   may grow, or keep its size while replacing one): with fewer, one crash can lose the
//!   majority that holds an acknowledged append (two voters need both, one voter is a single
//!   disk), which breaks "every acknowledged COMMIT survives any single crash";
//! - the voters that answered the leader just now are a majority of the new voter set, or the
//!   group could not commit anything more (not even the change back).
//!
//! `FORCE` overrides the last two, and the leader logs that it did. "Answered just now" is
//! measured, not guessed from metrics that may be stale: before deciding, the leader commits an
//! empty entry and waits briefly for each voter's replication to reach it
//! ([`REACHABLE_WAIT`]); a voter that has not acknowledged it by then counts as unreachable.
//!
//! [`membership_change_allowed`] is the decision, a pure function of the three sets.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::types::NodeId;

/// The fewest voters that survive any single crash with a majority left.
pub const MIN_SAFE_VOTERS: usize = 3;

/// How long the leader waits for the voters to acknowledge its probe entry before it counts
/// those that have not as unreachable.
pub const REACHABLE_WAIT: Duration = Duration::from_secs(2);

/// Why a membership change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The change would leave no voter at all.
    #[error("the change would leave no voter; a group needs at least one")]
    NoVoters,
    /// The change would shrink the group below [`MIN_SAFE_VOTERS`] voters.
    #[error(
        "the change would leave {left} voter(s): below {MIN_SAFE_VOTERS}, one crash can lose \
         acknowledged appends; add FORCE to make it anyway"
    )]
    TooFew {
        /// Voters after the change.
        left: usize,
    },
    /// The voters that answered just now are not a majority of the new voter set.
    #[error(
        "of the new voters {proposed:?} only {reachable:?} answered the leader just now, not a \
         majority: the group could commit nothing more; add FORCE to make it anyway"
    )]
    NoMajority {
        /// The voter set after the change.
        proposed: Vec<NodeId>,
        /// Those of them that answered.
        reachable: Vec<NodeId>,
    },
}

impl Refusal {
    /// Whether `FORCE` may override it.
    pub fn forceable(&self) -> bool {
        !matches!(self, Refusal::NoVoters)
    }
}

/// Whether changing the voters from `current` to `proposed` is allowed, given the voters that
/// answered the leader just now (`reachable`, the leader included). See the module header.
pub fn membership_change_allowed(
    current: &BTreeSet<NodeId>,
    reachable: &BTreeSet<NodeId>,
    proposed: &BTreeSet<NodeId>,
) -> Result<(), Refusal> {
    if proposed.is_empty() {
        return Err(Refusal::NoVoters);
    }
    if proposed.len() < MIN_SAFE_VOTERS && proposed.len() < current.len() {
        return Err(Refusal::TooFew {
            left: proposed.len(),
        });
    }
    let up: Vec<NodeId> = proposed.intersection(reachable).copied().collect();
    if up.len() * 2 <= proposed.len() {
        return Err(Refusal::NoMajority {
            proposed: proposed.iter().copied().collect(),
            reachable: up,
        });
    }
    Ok(())
}

/// [`membership_change_allowed`], with `FORCE` applied: a forceable refusal is logged and let
/// through.
pub fn decide(
    current: &BTreeSet<NodeId>,
    reachable: &BTreeSet<NodeId>,
    proposed: &BTreeSet<NodeId>,
    force: bool,
) -> Result<(), Refusal> {
    match membership_change_allowed(current, reachable, proposed) {
        Err(r) if force && r.forceable() => {
            tracing::warn!(
                "membership change from {current:?} to {proposed:?} forced past a refusal: {r}"
            );
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn removing_one_of_three_healthy_voters_is_refused_as_too_few_unless_forced() {
        let all = set(&[1, 2, 3]);
        let r = membership_change_allowed(&all, &all, &set(&[1, 3]));
        assert_eq!(r, Err(Refusal::TooFew { left: 2 }));
        assert_eq!(decide(&all, &all, &set(&[1, 3]), true), Ok(()));
        // Then to one voter: shrinking further needs FORCE again (the attack was
        // exactly these two removals).
        assert_eq!(
            membership_change_allowed(&set(&[1, 3]), &set(&[1, 3]), &set(&[1])),
            Err(Refusal::TooFew { left: 1 })
        );
        // A group already below three may grow back, or replace a member, without FORCE.
        assert_eq!(
            membership_change_allowed(&set(&[1]), &set(&[1, 2]), &set(&[1, 2])),
            Ok(())
        );
        assert_eq!(
            membership_change_allowed(&set(&[1, 2]), &set(&[1, 2, 3]), &set(&[1, 3])),
            Ok(())
        );
    }

    #[test]
    fn replacing_a_voter_of_a_healthy_group_is_allowed() {
        let four = set(&[1, 2, 3, 4]);
        // 3 -> 4 (the new replica caught up as a learner, so it answers).
        assert_eq!(
            membership_change_allowed(&set(&[1, 2, 3]), &four, &four),
            Ok(())
        );
        // 4 -> 3.
        assert_eq!(
            membership_change_allowed(&four, &four, &set(&[1, 3, 4])),
            Ok(())
        );
    }

    #[test]
    fn a_change_whose_new_voters_are_mostly_unreachable_is_refused_unless_forced() {
        // Two of three down: adding a fourth leaves 2 of 4 answering.
        let r = membership_change_allowed(&set(&[1, 2, 3]), &set(&[1, 4]), &set(&[1, 2, 3, 4]));
        assert_eq!(
            r,
            Err(Refusal::NoMajority {
                proposed: vec![1, 2, 3, 4],
                reachable: vec![1, 4]
            })
        );
        assert_eq!(
            decide(&set(&[1, 2, 3]), &set(&[1, 4]), &set(&[1, 2, 3, 4]), true),
            Ok(())
        );
        // One of five down, removing a healthy one: 3 of 4 answer, allowed.
        let five = set(&[1, 2, 3, 4, 5]);
        assert_eq!(
            membership_change_allowed(&five, &set(&[1, 2, 3, 4]), &set(&[1, 2, 3, 5])),
            Ok(())
        );
        // Two of five down, removing a healthy one: 2 of 4 answer, refused.
        assert!(matches!(
            membership_change_allowed(&five, &set(&[1, 2, 3]), &set(&[1, 2, 4, 5])),
            Err(Refusal::NoMajority { .. })
        ));
    }

    #[test]
    fn removing_the_last_voter_is_refused_even_with_force() {
        let one = set(&[1]);
        assert_eq!(
            decide(&one, &one, &BTreeSet::new(), true),
            Err(Refusal::NoVoters)
        );
    }

    #[test]
    fn the_refusal_says_what_would_happen_and_how_to_override() {
        let msg = Refusal::TooFew { left: 2 }.to_string();
        assert!(
            msg.contains("leave 2 voter(s)") && msg.contains("FORCE"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }
}
