#!/usr/bin/env bash
# The long form of the Kubernetes lab: the chaos suite's workload (ledger transfers and raw
# appends, `quorum` acknowledgements) runs in a pod of the lab's Kubernetes while the cluster the
# chart installed goes through rounds of, one after another (the upgrade in the first only):
#   (a) a node's pod deleted with no grace period,
#   (b) the pod of the node leading most partitions evicted (as a Kubernetes node drain does),
#   (c) an upgrade 0.1.0 -> 0.1.1 rolled by the operator,
#   (d) a scale 3 -> 5 -> 3 (new pods join; removed ones are decommissioned first);
# then the workload reads every replica of every partition back and checks that nothing
# acknowledged was lost, nothing is stored twice, the replicas agree and every ledger book holds
# (`anthill workload`, the chaos suite's checker). `helm uninstall`, then the lab goes down.
#
#   tests/e2e/lab/long.sh [--minutes N]    N: the workload's length (default 10; the faults must fit)
#
# Bounded: every wait has a timeout, and the whole run at most N + 15 minutes. Prints the
# workload's report (JSON) and exits 0 only when it passed. Needs root, like the lab.
set -Eeuo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
minutes=10
while [[ $# -gt 0 ]]; do
    case "$1" in
        --minutes) minutes="$2"; shift 2 ;;
        *) echo "usage: tests/e2e/lab/long.sh [--minutes N]" >&2; exit 2 ;;
    esac
done
[[ "$minutes" =~ ^[0-9]+$ ]] && (( minutes >= 4 && minutes <= 120 )) || { echo "--minutes must be 4 to 120" >&2; exit 2; }

say() { echo "tests/e2e/lab/long.sh: $(date +%T) $*" >&2; }
bin="$repo/.tools/bin"
lab="${ANTHILL_KUBELAB:-/tmp/anthill-kubelab}"
images="$(mktemp -d /tmp/anthill-long-images.XXXXXX)"
kubectl() { "$bin/kubectl" --kubeconfig "$lab/kubeconfig" "$@"; }
helm() { KUBECONFIG="$lab/kubeconfig" HELM_CACHE_HOME="$images/helm" HELM_CONFIG_HOME="$images/helm" HELM_DATA_HOME="$images/helm" "$bin/helm" "$@"; }
watchdog=""
cleanup() {
    if [[ -n "$watchdog" ]]; then
        # Its sleep first (while it is still the sleep's parent); a killed sleep ends it quietly.
        pkill -P "$watchdog" 2>/dev/null || true
        kill "$watchdog" 2>/dev/null || true
    fi
    say "tearing down"
    bash "$repo/tests/e2e/lab/kube.sh" down || true
    rm -rf "$images"
}
trap cleanup EXIT
# Ends the whole run if it overstays (a wait that never ends cannot hold the machine).
# (Only a sleep that ran out stops it: one killed by the cleanup does not.)
( sleep $(( (minutes + 15) * 60 )) && { say "over time: stopping"; kill -TERM $$; } ) &
watchdog=$!

bash "$repo/tests/e2e/tools/install.sh" kubernetes kubelab helm
bash "$repo/tests/e2e/lab/images.sh" "$images" 0.1.0 release
bash "$repo/tests/e2e/lab/kube.sh" up "$images" >/dev/null
helm install anthill "$repo/charts/anthill" --namespace default \
    --set cluster.storage.storageClassName=lab --set cluster.storage.size=1Gi >/dev/null
kubectl wait anthillcluster/anthill --for=condition=Available --timeout=300s >/dev/null
say "cluster Available"

# Whether the cluster has $1 ready nodes, no change in progress, every partition led.
settled() {
    local want="$1" json
    json="$(kubectl get anthillcluster/anthill -o json)" || return 1
    python3 - "$want" "$json" <<'EOF'
import json, sys
want, c = int(sys.argv[1]), json.loads(sys.argv[2])
s = c.get("status", {})
reason = {x["type"]: x["reason"] for x in s.get("conditions", [])}
nodes = s.get("nodes", [])
ok = (s.get("observedGeneration") == c["metadata"].get("generation") and s.get("readyReplicas") == want and len(nodes) == want and all(n["role"] == "Ready" for n in nodes)
      and reason.get("Progressing") == "Stable" and reason.get("Available") == "AllPartitionsLed")
sys.exit(0 if ok else 1)
EOF
}
wait_settled() {
    local want="$1" what="$2" deadline=$((SECONDS + 600))
    sleep 5
    until settled "$want"; do
        (( SECONDS < deadline )) || { say "$what did not settle in 10 minutes"; kubectl get anthillcluster/anthill -o yaml >&2; exit 1; }
        sleep 3
    done
    say "$what: settled with $want nodes"
}

# The workload, in a pod of its own (it reaches the nodes by their DNS names).
kubectl run anthill-workload --image=anthill:0.1.0 --restart=Never --labels=app.kubernetes.io/name=anthill-workload \
    -- workload --server http://anthill:7400 --duration "${minutes}m" --clients 8 --json >/dev/null
kubectl wait pod/anthill-workload --for=condition=Ready --timeout=120s >/dev/null
say "workload running for $minutes minutes"
sleep 20

# Rounds of faults while the workload has time left for one more (about 3 minutes each); the
# upgrade goes in the first round only (versions never go down).
ends=$((SECONDS + minutes * 60 - 20))
round=0
while (( round == 0 || ends - SECONDS > 240 )); do
    round=$((round + 1))
    victim="anthill-$(( (round - 1) % 3 ))"
    say "round $round: (a) $victim deleted with no grace period"
    kubectl delete pod "$victim" --grace-period=0 --force >/dev/null 2>&1
    wait_settled 3 "(a)"

    busiest="$(kubectl get anthillcluster/anthill -o json | python3 -c 'import json,sys; n=json.load(sys.stdin)["status"]["nodes"]; print(max(n, key=lambda x: x["leaderships"])["name"])')"
    say "round $round: (b) evicting $busiest, which leads most partitions"
    echo "{\"apiVersion\":\"policy/v1\",\"kind\":\"Eviction\",\"metadata\":{\"name\":\"$busiest\",\"namespace\":\"default\"}}" \
        | kubectl create --raw "/api/v1/namespaces/default/pods/$busiest/eviction" -f - >/dev/null
    wait_settled 3 "(b)"

    if (( round == 1 )); then
        say "round $round: (c) upgrading to 0.1.1"
        kubectl patch anthillcluster/anthill --type=merge -p '{"spec":{"version":"0.1.1"}}' >/dev/null
        wait_settled 3 "(c)"
        [[ "$(kubectl get anthillcluster/anthill -o jsonpath='{.status.currentVersion}')" == 0.1.1 ]] || { say "(c) the version is not 0.1.1"; exit 1; }
    fi

    say "round $round: (d) scaling to 5"
    kubectl scale anthillcluster/anthill --replicas=5 >/dev/null
    wait_settled 5 "(d) up"
    say "round $round: (d) scaling to 3"
    kubectl scale anthillcluster/anthill --replicas=3 >/dev/null
    wait_settled 3 "(d) down"
done

phase="$(kubectl get pod anthill-workload -o jsonpath='{.status.phase}')"
[[ "$phase" == Running ]] || { say "the workload ended ($phase) before the faults did: give it more --minutes"; exit 1; }
say "faults done ($round rounds); waiting for the workload to finish and check"
deadline=$((SECONDS + minutes * 60 + 300))
until [[ "$(kubectl get pod anthill-workload -o jsonpath='{.status.phase}')" =~ ^(Succeeded|Failed)$ ]]; do
    (( SECONDS < deadline )) || { say "the workload did not finish"; exit 1; }
    sleep 5
done
report="$(kubectl logs anthill-workload 2>/dev/null | sed -n '/^{/,/^}/p')"
echo "$report"
passed="$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["passed"], r["operations"], r["acknowledged"], len(r["verdict"]["lost"]))' "$report")"
say "passed, operations, acknowledged, lost: $passed"
kubectl delete pod anthill-workload --wait=true >/dev/null
helm uninstall anthill --namespace default --wait >/dev/null
[[ "$passed" == True* ]]
