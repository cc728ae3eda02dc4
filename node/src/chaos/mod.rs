//! The chaos suite (issue 6): real `anthill node` processes under load while a nemesis kills,
//! pauses and partitions them, then a Jepsen-style check that nothing acknowledged was lost.
//!
//! Built so far: the history of operations and its checker ([`history`]), pure logic tested
//! with made-up histories. The harness, the workload, the nemesis, `anthill chaos` and the
//! report come next (see the notes).

pub mod history;
