//! Mirroring: copies of requests sent to the canary, whose answers never reach a client, and
//! the comparison of those answers with the ones served ([`compare`], pure).

pub mod compare;
