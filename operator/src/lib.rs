//! The Anthill Kubernetes operator: the `AnthillCluster` resource ([`crd`]), the objects it
//! becomes ([`resources`]) and the controller that keeps them ([`controller`]).

pub mod controller;
pub mod crd;
pub mod resources;
