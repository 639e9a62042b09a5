//! The standard set: the experiments every system runs (`dtkv-bench list`).

use super::{Dist, Workload};

/// One experiment of the standard set; every system runs the same list (`dtkv-bench list`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SuiteRow {
    /// What each client does.
    pub workload: Workload,
    /// How keys are drawn.
    pub dist: Dist,
    /// Client connections.
    pub clients: usize,
    /// Autocommit requests each client keeps in flight.
    pub depth: usize,
}

/// The standard set: autocommit PUT at 1 and 4 clients (how throughput grows with clients at
/// one request in flight, issue #20), each workload at 16 clients (the reference point), the
/// writes and transactions again at 64, and pipelined autocommit rows (16 in flight each).
pub fn standard_suite() -> Vec<SuiteRow> {
    use Dist::*;
    use Workload::*;
    let r = |workload, dist, clients, depth| SuiteRow {
        workload,
        dist,
        clients,
        depth,
    };
    vec![
        r(Put, Uniform, 1, 1),
        r(Put, Uniform, 4, 1),
        r(Put, Uniform, 16, 1),
        r(Get, Uniform, 16, 1),
        r(Mixed, Uniform, 16, 1),
        r(Rmw, Uniform, 16, 1),
        r(Rmw, Zipfian, 16, 1),
        r(Put, Uniform, 64, 1),
        r(Rmw, Uniform, 64, 1),
        r(Put, Uniform, 16, 16),
        r(Get, Uniform, 16, 16),
    ]
}

impl SuiteRow {
    /// `rmw zipfian 16 1`: what `dtkv-bench list` prints and `suite --only` matches.
    pub fn line(&self) -> String {
        let w = match self.workload {
            Workload::Rmw => "rmw".to_string(),
            w => w.name(0),
        };
        format!("{w} {} {} {}", self.dist.name(), self.clients, self.depth)
    }
}
