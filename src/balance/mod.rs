//! Balancing: choosing a backend of an upstream for one request.
//!
//! A [`Balancer`] is built once per config snapshot and read without locks; it only reads the live
//! in-flight counts of the members. One algorithm per file.

mod least_conn;

use crate::config::Balance;
use crate::upstream::Member;

/// The selection algorithm of one upstream.
#[derive(Debug)]
pub enum Balancer {
    LeastConn,
}

impl Balancer {
    pub fn new(kind: Balance) -> Balancer {
        match kind {
            Balance::LeastConn => Balancer::LeastConn,
        }
    }

    /// Index into `members` of the chosen backend; `None` when `members` is empty.
    pub fn pick(&self, members: &[Member]) -> Option<usize> {
        match self {
            Balancer::LeastConn => least_conn::pick(members),
        }
    }
}
