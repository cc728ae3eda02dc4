#!/usr/bin/env bash
# Installs the tools the end-to-end suites need and this machine lacks; idempotent, quiet when
# everything is there. Usage: tests/e2e/tools/install.sh [TOOL...]
#
#   iproute2   `ip` and `tc` (Debian's iproute2): the chaos suite's namespace and its cuts
#   consul     Consul server, built from its Go modules (pinned below)
#   kubernetes kube-apiserver and kubectl, built from Kubernetes' Go modules, and etcd (Debian's
#              etcd-server): the API server the operator's tests run against
#   helm       Helm 3, built from its Go module
#   terraform  Terraform >= 1.5: the one on PATH if it is that new, else OpenTofu built from its
#              Go module, linked under both names
#   ansible    ansible-core from PyPI, in a virtualenv of its own, and ansible-lint in another
#   grpcurl    grpcurl, built from its Go module: the node's gRPC API by hand
#   kubelab    what the Kubernetes lab adds to `kubernetes` to run pods (tests/e2e/lab/): kubelet,
#              kube-controller-manager, kube-scheduler and kube-proxy (Kubernetes' Go modules),
#              CoreDNS (its Go module), and Debian's containerd, runc, CNI plugins, umoci,
#              busybox-static and iptables; not part of `all` (the lab is a command of its own)
#   metallab   what the bare-metal lab needs (tests/e2e/lab/metal.sh): Debian's systemd-container
#              (systemd-nspawn), debootstrap and openssh-client, and the hosts' root filesystem:
#              a minimal Debian with systemd, sshd and Python, made once with debootstrap; not
#              part of `all` (the lab is a command of its own)
#   terraform-providers  the Terraform providers the cloud modules name that can be built here
#              (hetznercloud/hcloud, from its Go module), into .tools/terraform-providers
#              (`terraform init -plugin-dir`); the AWS and Google providers are not served
#   packer     Packer, built from its Go module (pinned below), with the plugins the image
#              recipe (packer/) names: ansible, amazon and googlecompute (their Go modules)
#   all        every tool above but kubelab and metallab
#
# No TOOL: iproute2 (what `cargo test` needs without the real-components suites).
#
# Built tools go to a cache kept across clones (ANTHILL_TOOLS_CACHE, default
# ~/.cache/anthill/tools/<name>-<version>/) and are linked into the repository's git-ignored
# `.tools/bin/`; a build that is already in the cache is not built again. A failed build fails
# this script with the build's own output; nothing is skipped. Debian only (this project's
# machines and CI). Runs of this script wait for each other (a lock in the cache).
set -euo pipefail

CONSUL_VERSION=1.20.2
# The versions of Consul's own sub-modules that its go.mod names at that version.
CONSUL_API=v1.31.0
CONSUL_ENVOYEXTENSIONS=v0.7.7
CONSUL_PROTO_PUBLIC=v0.6.2
CONSUL_SDK=v0.16.1
CONSUL_TROUBLESHOOT=v0.7.4
KUBERNETES_VERSION=1.34.2
HELM_VERSION=3.19.0
# The Kubernetes version Helm assumes where no cluster is asked (`helm template`, `helm lint`):
# that of the k8s.io modules Helm 3.19 is built with, as Helm's own Makefile sets it.
HELM_KUBE_MINOR=34
TERRAFORM_MIN=1.5
OPENTOFU_VERSION=1.10.6
ANSIBLE_CORE_VERSION=2.19.14
ANSIBLE_LINT_VERSION=26.10.1
GRPCURL_VERSION=1.9.3
# The bare-metal lab hosts' Debian, and the version of the recipe below that makes their root
# filesystem (change it when the recipe changes: the cached one is then made again).
METAL_SUITE=bookworm
METAL_ROOTFS_RECIPE=2
COREDNS_VERSION=1.14.7
HCLOUD_PROVIDER_VERSION=1.49.0
PACKER_VERSION=1.14.3
PACKER_ANSIBLE_VERSION=1.1.2
PACKER_AMAZON_VERSION=1.3.6
PACKER_GOOGLECOMPUTE_VERSION=1.1.9

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
bin="$repo/.tools/bin"
cache="${ANTHILL_TOOLS_CACHE:-$HOME/.cache/anthill/tools}"
mkdir -p "$bin" "$cache"
# Absolute: builds run in other folders, and the links must not depend on where they are.
cache="$(cd "$cache" && pwd)"

say() { echo "tests/e2e/tools/install.sh: $*" >&2; }

# Go builds here: the module proxy only (no `direct`: a missing module fails at once) and no
# checksum database (some of these modules' look-ups fail on this network).
go_env() { env GOPROXY=https://proxy.golang.org GOSUMDB=off GOFLAGS=-mod=mod GOTOOLCHAIN=local "$@"; }

install_iproute2() {
    if command -v ip >/dev/null && command -v tc >/dev/null; then return; fi
    say "installing iproute2"
    apt_install iproute2
}

# Links `$1` (a path in the cache, or a program of the system) into .tools/bin under the name `$2`.
link() { ln -sfn "$1" "$bin/$2"; }

# The program `$1` on PATH outside .tools/bin (whose links this script makes), or nothing.
system_command() {
    local dir own
    own="$(realpath "$bin")"
    local IFS=:
    for dir in $PATH; do
        [[ -n "$dir" && -d "$dir" ]] || continue
        [[ "$(realpath "$dir")" == "$own" ]] && continue
        if [[ -x "$dir/$1" && ! -d "$dir/$1" ]]; then
            echo "$dir/$1"
            return
        fi
    done
}

build_consul() {
    # Consul's go.mod has `replace` lines, so `go install` refuses it: a wrapper module
    # requires it and its sub-modules at the versions it names, with its `exclude` lines.
    cat >go.mod <<EOF
module anthill.local/tools/consul

go 1.22

require (
	github.com/hashicorp/consul v$CONSUL_VERSION
	github.com/hashicorp/consul/api $CONSUL_API
	github.com/hashicorp/consul/envoyextensions $CONSUL_ENVOYEXTENSIONS
	github.com/hashicorp/consul/proto-public $CONSUL_PROTO_PUBLIC
	github.com/hashicorp/consul/sdk $CONSUL_SDK
	github.com/hashicorp/consul/troubleshoot $CONSUL_TROUBLESHOOT
)

exclude (
	github.com/hashicorp/go-msgpack v1.1.5
	github.com/hashicorp/go-msgpack v1.1.6
)
EOF
    printf 'package tools\n\nimport _ "github.com/hashicorp/consul"\n' >tools.go
    go_env go build -trimpath -o "$1/consul" github.com/hashicorp/consul
}

install_consul() {
    cached_build "$cache/consul-$CONSUL_VERSION" consul "Consul $CONSUL_VERSION" \
        "from its Go modules (about 4 minutes on 2 cores)" build_consul
}

# Links the program `$2` of the cache folder `$1`, built first with `$5` if it is not there
# yet (`$3` names the tool, `$4` says how and how long, for the message).
cached_build() {
    local dest="$1" program="$2" what="$3" how="$4" builder="$5"
    if [[ ! -x "$dest/$program" ]]; then
        say "building $what $how"
        build_into "$dest" "$what" "$builder"
    fi
    link "$dest/$program" "$program"
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Builds into `$1` (a cache folder, made whole or not at all) by running the rest of the
# arguments in a fresh work folder; `$2` names the tool in messages.
build_into() {
    local dest="$1" name="$2"
    shift 2
    command -v go >/dev/null || { say "Go is needed to build $name"; exit 1; }
    local work status
    work="$(mktemp -d)"
    trap 'rm -rf "$work" "$dest.partial"' EXIT
    rm -rf "$dest.partial"
    mkdir -p "$dest.partial"
    # `set -e` is off in a subshell on the left of `||`; run it on its own and read its status.
    set +e
    (
        set -e
        cd "$work"
        "$@" "$dest.partial"
    )
    status=$?
    set -e
    if ((status != 0)); then
        say "building $name failed (output above)"
        exit 1
    fi
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
    rm -rf "$work"
    trap - EXIT
}

build_kubernetes() {
    build_kubernetes_commands "$1" kube-apiserver kubectl
}

build_kubernetes_node() {
    build_kubernetes_commands "$1" kubelet kube-controller-manager kube-scheduler kube-proxy
}

# Builds the Kubernetes commands named after `$1` (the output folder) from k8s.io/kubernetes.
build_kubernetes_commands() {
    local out="$1" v="v$KUBERNETES_VERSION" mod
    shift
    # Kubernetes' go.mod replaces its staging modules with folders of its own repository, so
    # `go install` refuses it: a wrapper module requires it and points every one of those
    # modules at its published release (v0.x.y for Kubernetes v1.x.y).
    mod="$(go_env go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    [[ -f "$mod" ]] || { say "the module proxy gave no go.mod for k8s.io/kubernetes@$v"; return 1; }
    {
        printf 'module anthill.local/tools/kubernetes\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$v"
        sed -n "s#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 v0.${KUBERNETES_VERSION#1.}#p" "$mod"
        printf ')\n'
    } >go.mod
    {
        printf 'package tools\n\nimport (\n'
        for cmd in "$@"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$cmd"; done
        printf ')\n'
    } >tools.go
    # Without these the binaries call themselves v0.0.0-master, which version checks refuse.
    local ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=${KUBERNETES_VERSION%%.*}"
        ldflags+=" -X $pkg.gitMinor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION") -X $pkg.gitTreeState=clean"
    done
    local packages=()
    for cmd in "$@"; do packages+=("k8s.io/kubernetes/cmd/$cmd"); done
    go_env go build -trimpath -ldflags "$ldflags" -o "$out/" "${packages[@]}"
}

install_kubernetes() {
    local dest="$cache/kubernetes-$KUBERNETES_VERSION"
    if [[ ! -x "$dest/kube-apiserver" || ! -x "$dest/kubectl" ]]; then
        say "building kube-apiserver and kubectl $KUBERNETES_VERSION from Kubernetes' Go modules (about 6 minutes on 2 cores)"
        build_into "$dest" "Kubernetes $KUBERNETES_VERSION" build_kubernetes
    fi
    link "$dest/kube-apiserver" kube-apiserver
    link "$dest/kubectl" kubectl
    if [[ -z "$(system_command etcd)" ]]; then
        say "installing etcd (Debian's etcd-server)"
        apt_install etcd-server
    fi
    local etcd
    etcd="$(system_command etcd)"
    [[ -n "$etcd" ]] || { say "etcd-server installed no etcd on PATH"; exit 1; }
    link "$etcd" etcd
}

build_coredns() {
    local out="$1"
    printf 'module anthill.local/tools/coredns\n\ngo 1.24.0\n\nrequire github.com/coredns/coredns v%s\n' "$COREDNS_VERSION" >go.mod
    printf 'package tools\n\nimport _ "github.com/coredns/coredns"\n' >tools.go
    go_env go build -trimpath -ldflags "-s -w" -o "$out/coredns" github.com/coredns/coredns
}

install_kubelab() {
    install_kubernetes
    local dest="$cache/kubernetes-node-$KUBERNETES_VERSION"
    if [[ ! -x "$dest/kubelet" || ! -x "$dest/kube-proxy" ]]; then
        say "building kubelet, kube-controller-manager, kube-scheduler and kube-proxy $KUBERNETES_VERSION (about 4 minutes on 2 cores)"
        build_into "$dest" "Kubernetes $KUBERNETES_VERSION node commands" build_kubernetes_node
    fi
    for cmd in kubelet kube-controller-manager kube-scheduler kube-proxy; do link "$dest/$cmd" "$cmd"; done
    cached_build "$cache/coredns-$COREDNS_VERSION" coredns "CoreDNS $COREDNS_VERSION" "from its Go module (about 4 minutes)" build_coredns
    local missing=()
    for program in containerd runc umoci busybox iptables; do
        [[ -n "$(system_command "$program")" ]] || missing+=("$program")
    done
    [[ -d /usr/lib/cni ]] || missing+=(cni)
    if ((${#missing[@]})); then
        say "installing containerd, runc, the CNI plugins, umoci, busybox-static and iptables (Debian)"
        apt_install containerd runc containernetworking-plugins umoci busybox-static iptables
    fi
}

# The bare-metal lab hosts' root filesystem, into `$1`: what every host shares, read-only under
# its own overlay (tests/e2e/lab/metal.sh writes each host's name, address and the lab's SSH key
# into that overlay). Host identity is left out: an empty machine-id (systemd makes one at
# boot) and no SSH host keys (made at sshd's first start).
build_metal_rootfs() {
    local root="$1/rootfs" mirror
    mirror="$(sed -n 's/^URIs: \(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,openssh-server,sudo,iproute2,python3,ca-certificates,procps,less \
        "$METAL_SUITE" "$root" "${mirror:-http://deb.debian.org/debian}" >"$1/debootstrap.log" 2>&1 ||
        { tail -20 "$1/debootstrap.log" >&2; return 1; }
    : >"$root/etc/machine-id"
    rm -f "$root"/etc/ssh/ssh_host_*
    mkdir -p "$root/etc/systemd/system/ssh.service.d"
    # Before Debian's own check (`sshd -t`), which fails with no host key.
    printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
        >"$root/etc/systemd/system/ssh.service.d/host-keys.conf"
    ln -sfn /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
    ln -sfn /dev/null "$root/etc/systemd/system/systemd-networkd-wait-online.service"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}

install_metallab() {
    local missing=()
    for program in systemd-nspawn debootstrap ssh ssh-keygen; do
        [[ -n "$(system_command "$program")" ]] || missing+=("$program")
    done
    if ((${#missing[@]})); then
        say "installing systemd-container, debootstrap and openssh-client (Debian)"
        apt_install systemd-container debootstrap openssh-client
    fi
    local dest="$cache/metal-rootfs-$METAL_SUITE-$METAL_ROOTFS_RECIPE"
    if [[ ! -d "$dest/rootfs" ]]; then
        say "making the lab hosts' Debian $METAL_SUITE root filesystem with debootstrap (about 2 minutes)"
        rm -rf "$dest.partial"
        mkdir -p "$dest.partial"
        if ! build_metal_rootfs "$dest.partial"; then
            say "debootstrap failed (its log's end above)"
            rm -rf "$dest.partial"
            exit 1
        fi
        rm -rf "$dest"
        mv "$dest.partial" "$dest"
        # Those of older recipes are not used again.
        find "$cache" -maxdepth 1 -name "metal-rootfs-*" ! -name "$(basename "$dest")" -exec rm -rf {} +
    fi
    # Beside the programs' links, not among them: a folder.
    ln -sfn "$dest/rootfs" "$repo/.tools/metal-rootfs"
}

build_helm() {
    local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
    for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
        ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$HELM_KUBE_MINOR"
    done
    env GOBIN="$1" GOPROXY=https://proxy.golang.org GOSUMDB=off GOTOOLCHAIN=local go install -trimpath \
        -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
}

install_helm() {
    cached_build "$cache/helm-$HELM_VERSION-kube1.$HELM_KUBE_MINOR" helm "Helm $HELM_VERSION" \
        "from its Go module (about 2 minutes on 2 cores)" build_helm
}

# Whether `$1` names a Terraform at least TERRAFORM_MIN.
# Builds the Go module `$1` at version `$2` into the program `$3`, in a copy of the module (these
# modules' go.mod have `replace` lines, so `go install` refuses them).
build_module_copy() {
    local module="$1" version="$2" out="$3" src
    src="$(go_env go mod download -json "$module@v$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -d "$src" ]] || { say "the module proxy gave no $module@v$version"; return 1; }
    mkdir -p "copy-${module##*/}"
    cp -r "$src/." "copy-${module##*/}"
    chmod -R u+w "copy-${module##*/}"
    (cd "copy-${module##*/}" && go_env go build -trimpath -ldflags "-s -w" -o "$out" .)
}

build_packer() {
    build_module_copy github.com/hashicorp/packer "$PACKER_VERSION" "$1/packer"
    local plugin version
    for plugin in ansible:$PACKER_ANSIBLE_VERSION amazon:$PACKER_AMAZON_VERSION googlecompute:$PACKER_GOOGLECOMPUTE_VERSION; do
        version="${plugin#*:}"
        plugin="${plugin%%:*}"
        say "building Packer's $plugin plugin $version"
        build_module_copy "github.com/hashicorp/packer-plugin-$plugin" "$version" "$PWD/packer-plugin-$plugin"
        # Packer finds it there (PACKER_PLUGIN_PATH), by the name and checksum it gives it.
        PACKER_PLUGIN_PATH="$1/plugins" CHECKPOINT_DISABLE=1 "$1/packer" plugins install \
            --path "$PWD/packer-plugin-$plugin" "github.com/hashicorp/$plugin" >/dev/null
    done
}

install_packer() {
    local dest="$cache/packer-$PACKER_VERSION-ansible$PACKER_ANSIBLE_VERSION-amazon$PACKER_AMAZON_VERSION-gce$PACKER_GOOGLECOMPUTE_VERSION"
    cached_build "$dest" packer "Packer $PACKER_VERSION and its plugins" \
        "from their Go modules (about 7 minutes on 2 cores)" build_packer
    # Beside the programs' links, not among them: a folder (PACKER_PLUGIN_PATH).
    ln -sfn "$dest/plugins" "$repo/.tools/packer-plugins"
}

build_terraform_providers() {
    local dir="$1/registry.terraform.io/hetznercloud/hcloud/$HCLOUD_PROVIDER_VERSION/linux_amd64"
    mkdir -p "$dir"
    build_module_copy github.com/hetznercloud/terraform-provider-hcloud "$HCLOUD_PROVIDER_VERSION" \
        "$dir/terraform-provider-hcloud_v$HCLOUD_PROVIDER_VERSION"
}

install_terraform_providers() {
    local dest="$cache/terraform-providers-hcloud$HCLOUD_PROVIDER_VERSION"
    if [[ ! -d "$dest/registry.terraform.io" ]]; then
        say "building the Terraform provider hetznercloud/hcloud $HCLOUD_PROVIDER_VERSION from its Go module (about 4 minutes)"
        build_into "$dest" "the hcloud provider" build_terraform_providers
    fi
    # Beside the programs' links, not among them: a folder (terraform init -plugin-dir).
    ln -sfn "$dest" "$repo/.tools/terraform-providers"
}

new_enough_terraform() {
    local v
    v="$(CHECKPOINT_DISABLE=1 "$1" version 2>/dev/null | sed -n '1s/^Terraform v\([0-9]*\.[0-9]*\).*/\1/p')"
    [[ -n "$v" ]] && printf '%s\n%s\n' "$TERRAFORM_MIN" "$v" | sort -V -C
}

build_opentofu() {
    # OpenTofu's go.mod has `replace` lines too: build it in a copy of its own module.
    local src
    src="$(go_env go mod download -json "github.com/opentofu/opentofu@v$OPENTOFU_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -d "$src" ]] || { say "the module proxy gave no github.com/opentofu/opentofu@v$OPENTOFU_VERSION"; return 1; }
    cp -r "$src/." .
    chmod -R u+w .
    go_env go build -trimpath -ldflags "-s -w" -o "$1/tofu" ./cmd/tofu
}

install_terraform() {
    local onpath
    onpath="$(system_command terraform)"
    if [[ -n "$onpath" ]] && new_enough_terraform "$onpath"; then
        link "$onpath" terraform
        return
    fi
    local dest="$cache/opentofu-$OPENTOFU_VERSION"
    if [[ ! -x "$dest/tofu" ]]; then
        say "no Terraform >= $TERRAFORM_MIN on PATH: building OpenTofu $OPENTOFU_VERSION from its Go module (about 3 minutes)"
        build_into "$dest" "OpenTofu $OPENTOFU_VERSION" build_opentofu
    fi
    link "$dest/tofu" tofu
    link "$dest/tofu" terraform
}

# A virtualenv at `$1` with the PyPI package `$2` (name==version) in it, made once: the stamp is
# written once pip succeeded, and names the interpreter the virtualenv was made with, so one
# whose Python went away is made again. Made where it stays: its scripts name their interpreter
# by path.
pip_tool() {
    local dest="$1" package="$2"
    if [[ ! -f "$dest/.installed" ]] || ! "$dest/bin/python" -c '' 2>/dev/null; then
        say "installing $package from PyPI into a virtualenv"
        rm -rf "$dest"
        if ! python3 -m venv "$dest" || ! "$dest/bin/pip" install -q "$package"; then
            say "installing $package failed (output above)"
            rm -rf "$dest"
            exit 1
        fi
        "$dest/bin/python" --version >"$dest/.installed"
    fi
}

install_ansible() {
    local dest="$cache/ansible-core-$ANSIBLE_CORE_VERSION"
    pip_tool "$dest" "ansible-core==$ANSIBLE_CORE_VERSION"
    for script in ansible ansible-playbook ansible-inventory ansible-galaxy; do
        link "$dest/bin/$script" "$script"
    done
    # In a virtualenv of its own: it brings the ansible-core it wants.
    pip_tool "$cache/ansible-lint-$ANSIBLE_LINT_VERSION" "ansible-lint==$ANSIBLE_LINT_VERSION"
    link "$cache/ansible-lint-$ANSIBLE_LINT_VERSION/bin/ansible-lint" ansible-lint
}

build_grpcurl() {
    env GOBIN="$1" GOPROXY=https://proxy.golang.org GOSUMDB=off GOTOOLCHAIN=local \
        go install -trimpath -ldflags "-s -w -X main.version=v$GRPCURL_VERSION" "github.com/fullstorydev/grpcurl/cmd/grpcurl@v$GRPCURL_VERSION"
}

install_grpcurl() {
    cached_build "$cache/grpcurl-$GRPCURL_VERSION" grpcurl "grpcurl $GRPCURL_VERSION" \
        "from its Go module (about a minute)" build_grpcurl
}

all=(iproute2 consul kubernetes helm terraform terraform-providers ansible grpcurl packer)
tools=("$@")
((${#tools[@]})) || tools=(iproute2)
for tool in "${tools[@]}"; do
    [[ "$tool" == all ]] && { tools=("${all[@]}"); break; }
done

exec 9>"$cache/.lock"
flock 9
for tool in "${tools[@]}"; do
    case "$tool" in
        iproute2) install_iproute2 ;;
        consul) install_consul ;;
        kubernetes) install_kubernetes ;;
        helm) install_helm ;;
        terraform) install_terraform ;;
        ansible) install_ansible ;;
        grpcurl) install_grpcurl ;;
        packer) install_packer ;;
        terraform-providers) install_terraform_providers ;;
        kubelab) install_kubelab ;;
        metallab) install_metallab ;;
        *) say "unknown tool '$tool' (known: ${all[*]} kubelab metallab all)"; exit 2 ;;
    esac
done
