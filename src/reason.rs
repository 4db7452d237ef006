//! What a counter counts: its name and meaning. Depends on nothing, so any stage can declare
//! its counters beside the code that counts them.

/// A counter of something that went wrong or was dropped: its name (the `reason` label) and
/// what it counts. Declared once beside the code that counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Reason {
    /// Counter name, snake_case.
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
}

impl Reason {
    /// A reason named `name` that counts `help`.
    pub const fn new(name: &'static str, help: &'static str) -> Reason {
        Reason { name, help }
    }
}
