//! The real programs that `tools/install.sh` brings, each made to do real work here: a
//! Kubernetes API server with etcd that `kubectl` and `helm` use, Terraform applying a
//! configuration, Ansible running a play, grpcurl calling a real node. The operator, chart and
//! provisioning suites build on these; this suite tells first when one of them stops working.

use std::path::Path;
use std::process::Command;

use anthill_e2e::kube::ApiServer;
use anthill_node::local::ChildNode;

/// Runs `program args` in `dir` with `env`; its stdout, or a panic with what it printed.
fn run(program: &Path, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {} failed:\n{}\n{}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kube_apiserver_serves_readyz_at_its_pinned_version_and_kubectl_creates_and_reads_a_configmap() {
    let api = ApiServer::start();
    let version: serde_json::Value = serde_json::from_str(&api.kubectl(&["version", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.34.2", "{version}");
    assert_eq!(version["clientVersion"]["gitVersion"], "v1.34.2", "{version}");
    api.kubectl(&["create", "configmap", "anthill-probe", "--from-literal=greeting=hello"]).unwrap();
    let read = api.kubectl(&["get", "configmap", "anthill-probe", "-o", "jsonpath={.data.greeting}"]).unwrap();
    assert_eq!(read, "hello");
    // RBAC is on: a token nobody granted anything is refused.
    let err = api.kubectl(&["--token=nobody", "get", "configmaps"]).unwrap_err();
    assert!(err.contains("Unauthorized") || err.contains("forbidden"), "{err}");
}

#[test]
fn helm_installs_a_chart_into_the_api_server_and_uninstalls_it() {
    let helm = anthill_e2e::tool("helm");
    let api = ApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("probe");
    std::fs::create_dir_all(chart.join("templates")).unwrap();
    std::fs::write(chart.join("Chart.yaml"), "apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: \">=1.30.0-0\"\n").unwrap();
    std::fs::write(chart.join("values.yaml"), "greeting: hello\n").unwrap();
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-probe\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
    )
    .unwrap();
    let kubeconfig = api.kubeconfig.display().to_string();
    // Helm keeps its cache and config under HOME unless told; keep them in the test's folder.
    let home = dir.path().display().to_string();
    let env = [("KUBECONFIG", kubeconfig.as_str()), ("HOME", home.as_str())];
    let version = run(&helm, &["version", "--short"], dir.path(), &env);
    assert!(version.starts_with("v3.19.0"), "{version}");
    run(&helm, &["install", "first", "./probe", "--set", "greeting=bonjour", "--wait", "--timeout", "60s"], dir.path(), &env);
    let read = api.kubectl(&["get", "configmap", "first-probe", "-o", "jsonpath={.data.greeting}"]).unwrap();
    assert_eq!(read, "bonjour");
    let releases: serde_json::Value = serde_json::from_str(&run(&helm, &["list", "-o", "json"], dir.path(), &env)).unwrap();
    assert_eq!(releases[0]["name"], "first", "{releases}");
    assert_eq!(releases[0]["status"], "deployed", "{releases}");
    run(&helm, &["uninstall", "first", "--wait"], dir.path(), &env);
    let gone = api.kubectl(&["get", "configmap", "first-probe"]).unwrap_err();
    assert!(gone.contains("NotFound"), "{gone}");
}

#[test]
fn terraform_applies_a_configuration_and_a_second_plan_changes_nothing() {
    let terraform = anthill_e2e::tool("terraform");
    let dir = tempfile::tempdir().unwrap();
    // terraform_data is built in: no provider to fetch. The CLI config keeps init off the network.
    std::fs::write(dir.path().join("cli.tfrc"), "disable_checkpoint = true\n").unwrap();
    std::fs::write(
        dir.path().join("main.tf"),
        "terraform {\n  required_version = \">= 1.5\"\n}\n\nvariable \"hosts\" {\n  type = list(string)\n}\n\n\
         resource \"terraform_data\" \"host\" {\n  for_each = toset(var.hosts)\n  input    = \"${each.key}:7070\"\n}\n\n\
         output \"endpoints\" {\n  value = sort([for h in terraform_data.host : h.output])\n}\n",
    )
    .unwrap();
    let cli = dir.path().join("cli.tfrc").display().to_string();
    let env = [("TF_CLI_CONFIG_FILE", cli.as_str()), ("TF_IN_AUTOMATION", "1"), ("CHECKPOINT_DISABLE", "1")];
    let hosts = "-var=hosts=[\"10.0.0.1\",\"10.0.0.2\"]";
    run(&terraform, &["init", "-input=false"], dir.path(), &env);
    run(&terraform, &["apply", "-auto-approve", "-input=false", hosts], dir.path(), &env);
    let outputs: serde_json::Value = serde_json::from_str(&run(&terraform, &["output", "-json"], dir.path(), &env)).unwrap();
    assert_eq!(outputs["endpoints"]["value"], serde_json::json!(["10.0.0.1:7070", "10.0.0.2:7070"]), "{outputs}");
    // -detailed-exitcode: 0 is "no changes", 2 would be changes.
    run(&terraform, &["plan", "-detailed-exitcode", "-input=false", hosts], dir.path(), &env);
}

#[test]
fn ansible_runs_a_play_on_this_host_and_a_second_run_changes_nothing() {
    let playbook = anthill_e2e::tool("ansible-playbook");
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out/anthill.yaml");
    std::fs::write(
        dir.path().join("inventory.ini"),
        "[anthill]\nlocalhost ansible_connection=local ansible_python_interpreter=\"{{ ansible_playbook_python }}\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("play.yml"),
        format!(
            "- hosts: anthill\n  gather_facts: false\n  tasks:\n    - ansible.builtin.file:\n        path: {}\n        state: directory\n        mode: \"0755\"\n\
             \x20   - ansible.builtin.copy:\n        dest: {}\n        content: \"cluster: test\\n\"\n        mode: \"0644\"\n",
            target.parent().unwrap().display(),
            target.display()
        ),
    )
    .unwrap();
    let local = dir.path().join("ansible-local").display().to_string();
    let env = [("ANSIBLE_LOCAL_TEMP", local.as_str()), ("ANSIBLE_NOCOLOR", "1")];
    let recap = |out: &str| out.lines().find(|l| l.starts_with("localhost")).map(str::to_string).unwrap_or_default();
    let first = run(&playbook, &["-i", "inventory.ini", "play.yml"], dir.path(), &env);
    assert!(recap(&first).contains("changed=2"), "{first}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "cluster: test\n");
    let second = run(&playbook, &["-i", "inventory.ini", "play.yml"], dir.path(), &env);
    assert!(recap(&second).contains("changed=0") && recap(&second).contains("failed=0"), "{second}");
}

#[test]
fn grpcurl_lists_a_nodes_services_through_reflection_and_appends_and_reads_an_event() {
    let grpcurl = anthill_e2e::tool("grpcurl");
    let dir = tempfile::tempdir().unwrap();
    let node = ChildNode::spawn(&anthill_e2e::anthill(), &dir.path().join("node"), &[]).expect("a node starts");
    let address = node.grpc_addr.to_string();
    let services = run(&grpcurl, &["-plaintext", &address, "list"], dir.path(), &[]);
    for service in ["anthill.v1.EventLog", "anthill.v1.Ledger", "anthill.v1.Node"] {
        assert!(services.lines().any(|l| l == service), "{service} not among:\n{services}");
    }
    // "aGVsbG8=" is "hello": bytes travel as base64 in gRPC's JSON form.
    let append = r#"{"stream":"orders-1","events":[{"type":"OrderPlaced","payload":"aGVsbG8="}]}"#;
    let appended: serde_json::Value =
        serde_json::from_str(&run(&grpcurl, &["-plaintext", "-d", append, &address, "anthill.v1.EventLog/Append"], dir.path(), &[]))
            .unwrap();
    // uint64 fields are strings in gRPC's JSON form.
    assert_eq!(appended["streamVersion"], "1", "{appended}");
    let read: serde_json::Value = serde_json::from_str(&run(
        &grpcurl,
        &["-plaintext", "-d", r#"{"stream":"orders-1","fromVersion":"1"}"#, &address, "anthill.v1.EventLog/Read"],
        dir.path(),
        &[],
    ))
    .unwrap();
    assert_eq!(read["events"][0]["type"], "OrderPlaced", "{read}");
    assert_eq!(read["events"][0]["payload"], "aGVsbG8=", "{read}");
    assert_eq!(read["events"][0]["position"], appended["lastPosition"], "{read}");
    node.terminate(std::time::Duration::from_secs(10)).unwrap();
}
