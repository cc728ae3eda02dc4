//! The chaos suite (issue 6): real `anthill node` processes under load while a nemesis kills,
//! pauses and partitions them, then a Jepsen-style check that nothing acknowledged was lost.
//!
//! Built so far: the history of operations and its checker ([`history`]), pure logic tested
//! with made-up histories; one run with leader kills ([`run`]), and `anthill chaos`. The other
//! faults, ledger transfers, the picture and `tests/e2e` come next (see the notes).

pub mod history;
pub mod run;
