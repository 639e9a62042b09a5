//! The dependency graph and its cycles: `ww`/`wr`/`rw` edges between committed transactions,
//! the strongly connected components they form, and each forbidden cycle found in one,
//! classified (G0, G1c, G-single, G-nonadjacent) and explained.
//!
//! Invariant: a cycle is reported only if no two of its `rw` edges are adjacent (write skew is
//! allowed under snapshot isolation), and only over keys whose version order is known.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use super::super::history::{List, Outcome};
use super::{external_reads, Checker, Edge, Rel};

impl Checker<'_> {
    fn link(&mut self, from: usize, to: usize, rel: Rel, key: u64) {
        if from != to && self.committed[from] && self.committed[to] {
            self.edges[from].push(Edge { to, rel, key });
        }
    }

    pub(super) fn graph(&mut self) {
        let orders: Vec<(u64, List)> = self
            .order
            .iter()
            .filter(|(k, _)| !self.broken.contains(k))
            .map(|(k, o)| (*k, o.clone()))
            .collect();
        for (key, order) in &orders {
            for p in order.windows(2) {
                if let (Some(&a), Some(&b)) = (
                    self.writer.get(&(*key, p[0])),
                    self.writer.get(&(*key, p[1])),
                ) {
                    self.link(a, b, Rel::Ww, *key);
                }
            }
        }
        // Committed appends nobody observed came after every version anyone observed.
        let mut unseen: HashMap<u64, Vec<usize>> = HashMap::new();
        for (&(w, key), elems) in &self.appends {
            if self.txns[w].outcome == Outcome::Ok
                && !self.broken.contains(&key)
                && elems
                    .iter()
                    .any(|e| !self.position.contains_key(&(key, *e)))
            {
                unseen.entry(key).or_default().push(w);
            }
        }
        let mut links = Vec::new();
        for (key, ws) in &unseen {
            let last = self.order.get(key).and_then(|o| o.last());
            if let Some(&a) = last.and_then(|e| self.writer.get(&(*key, *e))) {
                links.extend(ws.iter().map(|&w| (a, w, Rel::Ww, *key)));
            }
        }
        let empty = Vec::new();
        for t in self.oks() {
            for (key, v) in external_reads(t) {
                if self.broken.contains(&key) {
                    continue;
                }
                let order = self.order.get(&key).unwrap_or(&empty);
                if let Some(&w) = v.last().and_then(|e| self.writer.get(&(key, *e))) {
                    links.push((w, t.id, Rel::Wr, key));
                }
                if let Some(&w) = order.get(v.len()).and_then(|e| self.writer.get(&(key, *e))) {
                    links.push((t.id, w, Rel::Rw, key));
                } else if v.len() == order.len() {
                    for &w in unseen.get(&key).unwrap_or(&Vec::new()) {
                        links.push((t.id, w, Rel::Rw, key));
                    }
                }
            }
        }
        for (a, b, r, k) in links {
            self.link(a, b, r, k);
        }
    }

    /// Cycles SI forbids: those without two adjacent `rw` edges.
    pub(super) fn cycles(&mut self) {
        // Composite steps: a -(ww|wr)-> b, optionally followed by b -rw-> c.
        let steps: Vec<Vec<(usize, usize)>> = self
            .edges
            .iter()
            .map(|out| {
                // (to, via b or usize::MAX)
                let mut s = Vec::new();
                for e in out.iter().filter(|e| e.rel != Rel::Rw) {
                    s.push((e.to, usize::MAX));
                    for r in self.edges[e.to].iter().filter(|r| r.rel == Rel::Rw) {
                        s.push((r.to, e.to));
                    }
                }
                s.sort_unstable();
                s.dedup_by_key(|x| x.0);
                s
            })
            .collect();
        let adj: Vec<Vec<usize>> = steps
            .iter()
            .map(|s| s.iter().map(|x| x.0).collect())
            .collect();
        let mut found = Vec::new();
        for scc in tarjan(&adj) {
            let in_scc: HashSet<usize> = scc.iter().copied().collect();
            let self_loop = scc.len() == 1 && steps[scc[0]].iter().any(|s| s.0 == scc[0]);
            if scc.len() == 1 && !self_loop {
                continue;
            }
            let path = shortest_cycle(scc[0], &steps, &in_scc);
            found.push(self.describe_cycle(&path, &steps));
        }
        for (k, t, e) in found {
            self.push(k, t, e);
        }
    }

    /// Expands composite steps into real edges, classifies and explains the cycle.
    fn describe_cycle(
        &self,
        path: &[usize],
        steps: &[Vec<(usize, usize)>],
    ) -> (&'static str, Vec<usize>, String) {
        let mut hops: Vec<(usize, Edge)> = Vec::new();
        for (i, &a) in path.iter().enumerate() {
            let b = path[(i + 1) % path.len()];
            let &(_, via) = steps[a]
                .iter()
                .find(|s| s.0 == b)
                .expect("step on the path");
            let edge = |x: usize, y: usize, rw: bool| {
                *self.edges[x]
                    .iter()
                    .find(|e| e.to == y && (e.rel == Rel::Rw) == rw)
                    .expect("edge behind a step")
            };
            if via == usize::MAX {
                hops.push((a, edge(a, b, false)));
            } else {
                hops.push((a, edge(a, via, false)));
                hops.push((via, edge(via, b, true)));
            }
        }
        let rws = hops.iter().filter(|(_, e)| e.rel == Rel::Rw).count();
        let kind = match rws {
            0 if hops.iter().all(|(_, e)| e.rel == Rel::Ww) => "G0",
            0 => "G1c",
            1 => "G-single",
            _ => "G-nonadjacent",
        };
        let mut text = format!(
            "a dependency cycle snapshot isolation forbids ({kind}{}):",
            if rws == 1 { ", read skew" } else { "" }
        );
        for (from, e) in &hops {
            let why = match e.rel {
                Rel::Ww => "appended to it just before",
                Rel::Wr => "wrote what was read by",
                Rel::Rw => "read a version overwritten by",
            };
            let _ = write!(
                text,
                "\n    T{from} -{}-> T{} (key {}: T{from} {why} T{})",
                e.rel.name(),
                e.to,
                e.key,
                e.to
            );
        }
        let mut txns: Vec<usize> = hops.iter().map(|(f, _)| *f).collect();
        txns.dedup();
        (kind, txns, text)
    }
}

/// Strongly connected components (iterative Tarjan).
fn tarjan(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNSEEN: usize = usize::MAX;
    let n = adj.len();
    let (mut index, mut low, mut on) = (vec![UNSEEN; n], vec![0; n], vec![false; n]);
    let (mut stack, mut out, mut next) = (Vec::new(), Vec::new(), 0);
    for root in 0..n {
        if index[root] != UNSEEN {
            continue;
        }
        let mut calls = vec![(root, 0usize)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on[root] = true;
        while let Some(top) = calls.last_mut() {
            let v = top.0;
            if let Some(&w) = adj[v].get(top.1) {
                top.1 += 1;
                if index[w] == UNSEEN {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on[w] = true;
                    calls.push((w, 0));
                } else if on[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(parent, _)) = calls.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut comp = Vec::new();
                loop {
                    let w = stack.pop().expect("tarjan stack");
                    on[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                out.push(comp);
            }
        }
    }
    out
}

/// A shortest cycle through `start` within one component (breadth-first).
fn shortest_cycle(start: usize, steps: &[Vec<(usize, usize)>], scc: &HashSet<usize>) -> Vec<usize> {
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &(w, _) in &steps[v] {
            if w == start {
                let mut path = vec![v];
                let mut x = v;
                while x != start {
                    x = parent[&x];
                    path.push(x);
                }
                path.reverse();
                return path;
            }
            if scc.contains(&w) && !parent.contains_key(&w) {
                parent.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("every vertex of a component lies on a cycle")
}
