//! A second opinion: the same history checked by the `adya` crate, a native port of Jepsen's
//! Elle, so that a bug in our own checker does not silently pass a bad history.
//!
//! The history goes to adya twice, as Elle's JSON: as list-append (reads reveal each key's
//! version order), and as read/write registers (each append writes its unique element, a read
//! returns the last element) together with dtkv's commit order (commit timestamps), which is
//! how a register history learns its version order. adya is asked for the model dtkv promises,
//! snapshot isolation with real-time order ("strong"); and for serializability, which dtkv does
//! not promise, to show the checker is exercised: write skew must be flagged there.

use adya::{check, Opts, Valid, Workload};

use super::history::History;

/// The model dtkv promises: snapshot isolation, where a transaction that starts after another
/// commits sees it.
pub const PROMISED: &str = "strong-snapshot-isolation";

/// adya's verdict on one view of a history.
#[derive(Debug)]
pub struct Verdict {
    /// Which view of the history was checked: list-append or registers.
    pub view: &'static str,
    /// The consistency model checked against.
    pub model: String,
    /// adya's answer.
    pub valid: Valid,
    /// The anomaly types adya found.
    pub anomaly_types: Vec<String>,
    /// adya's explanation of the first anomaly of each type.
    pub explanations: Vec<String>,
}

impl Verdict {
    /// The verdict as one line of the report.
    pub fn line(&self) -> String {
        let v = match self.valid {
            Valid::True => "valid".to_string(),
            Valid::False => format!("INVALID {:?}", self.anomaly_types),
            Valid::Unknown => format!("unknown {:?}", self.anomaly_types),
        };
        format!("{} as {}: {v}", self.view, self.model)
    }
}

fn opts(model: &str) -> Opts {
    Opts {
        models: vec![model.into()],
        ..Opts::default()
    }
}

fn verdict(view: &'static str, model: &str, r: adya::Report) -> Verdict {
    Verdict {
        view,
        model: model.into(),
        valid: r.valid,
        explanations: r
            .anomalies
            .values()
            .filter_map(|v| v.first())
            .map(|a| format!("{}: {}", a.kind, a.explanation))
            .collect(),
        anomaly_types: r.anomaly_types,
    }
}

/// The list-append view checked against `model`.
pub fn list_append(h: &History, model: &str) -> Verdict {
    let ah = adya::History::from_json(&h.to_elle_json()).expect("our own JSON parses");
    verdict(
        "list-append",
        model,
        check(&ah, Workload::ListAppend, &opts(model)),
    )
}

/// The register view with dtkv's commit order, checked against `model`.
pub fn register(h: &History, model: &str) -> Verdict {
    let (json, order) = h.to_register_json();
    let ah = adya::History::from_json(&json).expect("our own JSON parses");
    let o = Opts {
        transaction_order: Some(order),
        ..opts(model)
    };
    verdict("rw-register", model, check(&ah, Workload::RwRegister, &o))
}

/// Both views against the promised model. A history with no dependencies at all (too short)
/// comes back `Unknown`, which is not a failure.
pub fn promised(h: &History) -> Vec<Verdict> {
    vec![list_append(h, PROMISED), register(h, PROMISED)]
}
