//! The Anthill Kubernetes operator: the `AnthillCluster` resource ([`crd`]), the objects it
//! becomes ([`resources`]), the controller that keeps them ([`controller`]) and rolls a changed
//! template out one drained pod at a time ([`roll`]) and scales one pod at a time ([`scale`]); [`uninstall`] is the chart's pre-delete hook.

pub mod certs;
pub mod controller;
pub mod crd;
pub mod metrics;
pub mod nodes;
pub mod readme;
pub mod reference;
pub mod resources;
pub mod roll;
pub mod scale;
pub mod uninstall;
