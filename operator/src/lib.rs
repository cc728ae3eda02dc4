//! The Anthill Kubernetes operator (docs/kubernetes.md): the `AnthillCluster` resource
//! ([`crd`]); the controller that makes clusters of it comes next (issue 9).

pub mod crd;
