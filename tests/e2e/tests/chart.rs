//! The Helm chart (`charts/anthill`) with the real Helm and a real Kubernetes API server:
//! `helm lint` with each values file of `charts/anthill/ci/`, every manifest it renders accepted
//! by the API server (`kubectl apply --dry-run=server`, with the chart's CRD installed), bad
//! values refused by `values.schema.json` with the field named, and `helm install` /
//! `helm uninstall` making and removing the operator and the default AnthillCluster. (No kubelet
//! runs here: the pods themselves are issue 9's Kubernetes lab.)

use std::path::{Path, PathBuf};
use std::process::Command;

use anthill_e2e::kube::ApiServer;

fn chart() -> PathBuf {
    anthill_e2e::repository().join("charts/anthill")
}

fn values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files
}

/// `helm args` with its cache and config in `home` and the API server's kubeconfig.
fn helm(api: Option<&ApiServer>, home: &Path, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new(anthill_e2e::tool("helm"));
    command.args(args).env("HOME", home).env("HELM_CACHE_HOME", home.join("cache")).env("HELM_CONFIG_HOME", home.join("config"));
    if let Some(api) = api {
        command.env("KUBECONFIG", &api.kubeconfig);
    }
    let out = command.output().expect("helm runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("helm {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

/// `kubectl apply --dry-run=server -f -` of `manifests`.
fn dry_run(api: &ApiServer, manifests: &str) -> Result<String, String> {
    api.kubectl_stdin(&["apply", "--dry-run=server"], manifests)
}

#[test]
fn the_chart_lints_and_every_manifest_it_renders_is_accepted_by_the_api_server() {
    let home = tempfile::tempdir().unwrap();
    let chart = chart().display().to_string();
    helm(None, home.path(), &["lint", "--strict", &chart]).unwrap();
    let api = ApiServer::start();
    api.kubectl(&["apply", "--server-side", "-f", &format!("{chart}/crds")]).unwrap();
    api.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd/anthillclusters.anthill.io"]).unwrap();
    // What a namespace of a real cluster has (no controller-manager makes it here): the
    // `helm test` pod runs as it.
    api.kubectl(&["create", "serviceaccount", "default", "--namespace", "default"]).unwrap();
    let mut renders = vec![(String::from("defaults"), Vec::new())];
    renders.extend(values_files().into_iter().map(|f| (f.display().to_string(), vec!["-f".to_string(), f.display().to_string()])));
    for (name, extra) in renders {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        helm(None, home.path(), &[&["lint", "--strict", &chart][..], &extra].concat()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let rendered = helm(None, home.path(), &[&["template", "anthill", &chart, "--namespace", "default"][..], &extra].concat())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let accepted =
            dry_run(&api, &rendered).unwrap_or_else(|e| panic!("{name}: the API server refused a rendered manifest: {e}\n{rendered}"));
        for kind in ["deployment.apps/", "clusterrole.rbac.authorization.k8s.io/", "clusterrolebinding.rbac.authorization.k8s.io/"] {
            assert!(accepted.contains(kind), "{name}: no {kind} in\n{accepted}");
        }
        let cluster = rendered.contains("kind: AnthillCluster");
        assert_eq!(cluster, !name.contains("operator-only"), "{name}");
        if cluster {
            assert!(accepted.contains("anthillcluster.anthill.io/"), "{name}: {accepted}");
            assert!(accepted.contains("-test-append created"), "{name}: the helm test pod: {accepted}");
            // The test pod speaks TLS unless the cluster does not.
            assert_eq!(rendered.contains("- --tls-ca"), !rendered.contains("mode: Disabled"), "{name}:\n{rendered}");
        }
    }
}

#[test]
fn values_that_the_schema_refuses_are_named() {
    let home = tempfile::tempdir().unwrap();
    let chart = chart().display().to_string();
    for (set, named) in [
        ("cluster.replicas=0", "replicas"),
        ("cluster.replica=3", "replica"),
        ("cluster.storage.size=lots", "size"),
        ("cluster.coordination.store=Consul", "address"),
        ("cluster.placement.antiAffinity=Sometimes", "antiAffinity"),
        ("operator.image.pullPolicy=Maybe", "pullPolicy"),
        ("cluster.tls.mode=Sometimes", "mode"),
    ] {
        let refused = helm(None, home.path(), &["template", "anthill", &chart, "--set", set]).expect_err(set);
        assert!(refused.contains("values don't meet the specifications of the schema") && refused.contains(named), "{set}: {refused}");
    }
    let refused = helm(None, home.path(), &["template", "anthill", &chart, "--set", "operator.serviceAccount.create=false"])
        .expect_err("no service account to run as");
    assert!(refused.contains("operator.serviceAccount.name must name an existing ServiceAccount"), "{refused}");
    // Without the operator: the cluster alone, for an operator another release installed.
    let cluster_only = helm(None, home.path(), &["template", "anthill", &chart, "--set", "operator.enabled=false"]).unwrap();
    assert!(cluster_only.contains("kind: AnthillCluster"), "{cluster_only}");
    for kind in ["kind: Deployment", "kind: ClusterRole", "kind: ServiceAccount"] {
        assert!(!cluster_only.contains(kind), "{kind} rendered with operator.enabled=false:\n{cluster_only}");
    }
}

#[test]
fn helm_install_makes_the_operator_and_the_default_cluster_and_helm_uninstall_removes_them() {
    let home = tempfile::tempdir().unwrap();
    let chart = chart().display().to_string();
    let api = ApiServer::start();
    let notes = helm(Some(&api), home.path(), &["install", "anthill", &chart, "--namespace", "default"]).unwrap();
    assert!(notes.contains("kubectl get anthillclusters"), "{notes}");
    let spec = api
        .kubectl(&[
            "get",
            "anthillcluster",
            "anthill",
            "-o",
            "jsonpath={.spec.replicas} {.spec.version} {.spec.coordination.store} {.spec.tls.mode}",
        ])
        .unwrap();
    assert_eq!(spec, "3 0.1.0 Embedded Operator", "TLS is on by default");
    let image =
        api.kubectl(&["get", "deployment", "anthill-operator", "-o", "jsonpath={.spec.template.spec.containers[0].image}"]).unwrap();
    assert_eq!(image, "anthill-operator:0.1.0");
    let labels = api.kubectl(&["get", "deployment", "anthill-operator", "-o", "jsonpath={.metadata.labels}"]).unwrap();
    for label in ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"] {
        assert!(labels.contains(label), "{label}: {labels}");
    }
    // The cluster, named after the release, selects its node pods by name and instance: the
    // operator's pod must not be one of them (nor count in their budget, nor serve as a node).
    let operator_pod = api
        .kubectl(&["get", "deployment", "anthill-operator", "-o", r"jsonpath={.spec.template.metadata.labels.app\.kubernetes\.io/name}"])
        .unwrap();
    assert_eq!(operator_pod, "anthill-operator");
    let objects = [
        "anthillcluster/anthill",
        "deployment/anthill-operator",
        "clusterrole/default-anthill-operator",
        "serviceaccount/anthill-operator",
    ];
    for object in objects {
        api.kubectl(&["get", object]).unwrap_or_else(|e| panic!("{object} was not installed: {e}"));
    }
    helm(Some(&api), home.path(), &["uninstall", "anthill", "--namespace", "default", "--wait"]).unwrap();
    for object in objects {
        let gone = api.kubectl(&["get", object]).expect_err(object);
        assert!(gone.contains("NotFound"), "{object}: {gone}");
    }
    // Helm never deletes what crds/ installed: the CRD (and with it any other cluster) stays.
    api.kubectl(&["get", "crd", "anthillclusters.anthill.io"]).expect("the CRD stays");
}
