# An Anthill cluster on servers you already have: Terraform renders the Ansible inventory from
# `hosts` and the cluster settings and converges the hosts with the playbooks of `ansible/`
# (docs/bare-metal.md). What each change does:
# - first apply: every node installed and started; the cluster forms (the hosts listed then are
#   its founders);
# - a second apply with nothing changed: no change;
# - a new version, binary or setting: the nodes restart one at a time, each drained first;
# - a host added: the running nodes restart in turn with the longer member list, then the new
#   node starts and joins, and replica sets move onto it;
# - a host removed (or its address or raft_id changed): it is decommissioned first through
#   another member (its replicas move away, it leaves the coordination group), stopped, its
#   data deleted; then the rest restart in turn with the shorter list. One removal at a time.

locals {
  ansible_dir = var.ansible_dir != "" ? var.ansible_dir : abspath("${path.module}/../../../ansible")
  names       = [for h in var.hosts : h.name]
  tls_dir     = abspath(var.tls.dir != "" ? var.tls.dir : "${path.root}/anthill-tls")
  # The founders as first applied, less those removed since.
  founders = [for name in terraform_data.founders.output : name if contains(local.names, name)]

  settings = {
    ansible_ssh_private_key_file         = var.ssh_private_key_file
    ansible_ssh_common_args              = var.ssh_extra_args
    anthill_binary_src                   = var.anthill_binary
    anthill_release_url                  = var.release_url
    anthill_release_sha256               = var.release_sha256
    anthill_version                      = var.anthill_version
    anthill_partitions                   = var.partitions
    anthill_replication_factor           = var.replication_factor
    anthill_coordination                 = var.coordination.kind
    anthill_consul_address               = var.coordination.consul_address
    anthill_consul_key_prefix            = var.coordination.consul_key_prefix
    anthill_consul_token                 = var.consul_token_file != "" ? "{{ lookup('ansible.builtin.file', '${var.consul_token_file}') }}" : ""
    anthill_config_overrides             = var.config_overrides
    anthill_tls                          = var.tls.enabled
    anthill_tls_src_dir                  = local.tls_dir
    anthill_tls_generate                 = var.tls.generate
    anthill_tls_renew_within_days        = var.tls.renew_within_days
    anthill_encryption_key_src           = var.encryption_key_file != "" ? abspath(var.encryption_key_file) : ""
    anthill_encryption_previous_key_srcs = [for f in var.encryption_previous_key_files : abspath(f)]
    anthill_founders                     = local.founders
    consul_binary_src                    = var.consul.binary
    consul_version                       = var.consul.version
    consul_datacenter                    = var.consul.datacenter
    consul_management_token              = var.consul.management_token_file != "" ? "{{ lookup('ansible.builtin.file', '${var.consul.management_token_file}') }}" : ""
    consul_encrypt                       = var.consul.encrypt_key_file != "" ? "{{ lookup('ansible.builtin.file', '${var.consul.encrypt_key_file}') }}" : ""
  }
  consul_fixed = {
    servers = join(",", sort(var.consul.servers))
    encrypt = var.consul.encrypt_key_file != "" ? filesha256(var.consul.encrypt_key_file) : ""
  }
  # The hosts running Consul servers (their other settings are those of the `anthill` group).
  consul_servers = { hosts = { for name in var.consul.servers : name => {} } }
  host_vars = {
    for h in var.hosts : h.name => {
      ansible_host    = h.address
      ansible_user    = h.ssh_user
      anthill_raft_id = h.raft_id
      anthill_zone    = h.zone
      anthill_labels  = h.labels
      # A host added after the first apply joins the running cluster.
      anthill_join = !contains(terraform_data.founders.output, h.name)
    }
  }
  inventory = jsonencode({ all = { vars = local.settings, children = { anthill = { hosts = local.host_vars }, consul_servers = local.consul_servers } } })

  # Writes the inventory (from $INVENTORY) to a file of its own and runs $PLAYBOOK with it; the
  # playbook and its arguments follow.
  run_playbook = trimspace(<<-EOT
    set -eu
    inventory="$(mktemp --suffix=.json)"
    trap 'rm -f "$inventory"' EXIT
    printf '%s' "$INVENTORY" >"$inventory"
    "$PLAYBOOK" -i "$inventory"
  EOT
  )
}

# The hosts of the first apply: the cluster's founders. Kept as they were (a host added later
# joins the running cluster instead of founding another).
resource "terraform_data" "founders" {
  input = local.names
  lifecycle {
    ignore_changes = [input]
  }
}

# Whether the cluster speaks TLS, as first applied: nodes with and without TLS cannot talk, so
# a switch would cut replication in the middle of the rolling restart (the precondition of
# terraform_data.converge refuses it).
resource "terraform_data" "tls_fixed" {
  input = var.tls.enabled
  lifecycle {
    ignore_changes = [input]
  }
}

# Consul's servers and gossip key as first applied: changing either is an operation of
# Consul's own, which an apply refuses (the precondition of terraform_data.converge).
resource "terraform_data" "consul_fixed" {
  input = local.consul_fixed
  lifecycle {
    ignore_changes = [input]
  }
}

# One per host. A host leaving the list (or whose address or raft_id changed) is decommissioned
# before the rest converge: its replicas move to the others, then its node stops.
resource "terraform_data" "node" {
  for_each = { for h in var.hosts : h.name => h }

  triggers_replace = [each.value.address, each.value.raft_id]
  input = {
    name             = each.key
    ansible_dir      = local.ansible_dir
    ansible_playbook = var.ansible_playbook
    # Only this host, and another member (as the list is now) that takes its decommission and
    # follows it: the decommissioned one stops hearing of the cluster.
    inventory = jsonencode({ all = {
      vars = merge(local.settings, {
        anthill_decommission_via = try([for h in var.hosts : h.address if h.name != each.key][0], each.value.address)
        anthill_remove_data      = true
      })
      children = { anthill = { hosts = { (each.key) = local.host_vars[each.key] } }, consul_servers = local.consul_servers }
    } })
    script = local.run_playbook
  }

  provisioner "local-exec" {
    when        = destroy
    working_dir = self.input.ansible_dir
    # One removal at a time (Terraform destroys the instances in parallel): two decommissions
    # at once could each find enough members left.
    interpreter = ["flock", "/tmp/anthill-bare-metal-remove.lock", "/bin/sh", "-c"]
    command     = "${self.input.script} remove-node.yml -e anthill_remove=${self.input.name}"
    environment = {
      INVENTORY      = self.input.inventory
      PLAYBOOK       = self.input.ansible_playbook
      ANSIBLE_CONFIG = "${self.input.ansible_dir}/ansible.cfg"
    }
  }
}

# Converges every host (site.yml) whenever the inventory, the binary, the playbooks or the
# Consul token change; after the removed hosts were decommissioned.
resource "terraform_data" "converge" {
  triggers_replace = {
    inventory = sha256(local.inventory)
    binary    = var.anthill_binary != "" ? filesha256(var.anthill_binary) : var.release_sha256
    playbooks = sha256(join(",", [for f in sort(fileset(local.ansible_dir, "**")) : filesha256("${local.ansible_dir}/${f}")]))
    token     = var.consul_token_file != "" ? filesha256(var.consul_token_file) : ""
    # A new key-encryption key (or an earlier one given for a rotation) is placed and the nodes
    # restart in turn to read it.
    encryption = jsonencode([for f in concat([var.encryption_key_file], var.encryption_previous_key_files) : f != "" ? filesha256(f) : ""])
    consul = jsonencode([
      var.consul.binary != "" ? filesha256(var.consul.binary) : "",
      var.consul.management_token_file != "" ? filesha256(var.consul.management_token_file) : "",
      var.consul.encrypt_key_file != "" ? filesha256(var.consul.encrypt_key_file) : "",
    ])
  }

  lifecycle {
    precondition {
      condition     = alltrue([for name in var.consul.servers : contains(local.names, name)])
      error_message = "consul.servers: every server must be one of the hosts (a host running a Consul server is not removed by an apply: move the server first)."
    }
    precondition {
      condition     = terraform_data.consul_fixed.output == local.consul_fixed
      error_message = "consul: the servers and the gossip key are fixed at the first apply (Consul keeps its keyring and its Raft peers on disk; an apply cannot move servers or rotate the key: use `consul keyring` and Consul's own procedures, then record the new values with `terraform apply -replace=module.anthill.terraform_data.consul_fixed`)."
    }
    precondition {
      condition     = terraform_data.tls_fixed.output == var.tls.enabled
      error_message = "tls.enabled is fixed at the first apply: nodes with and without TLS cannot talk to each other, so a rolling restart cannot switch a running cluster. Set it back (stop every node first to switch, then `terraform apply -replace=module.anthill.terraform_data.tls_fixed`)."
    }
    precondition {
      condition     = length(var.encryption_previous_key_files) == 0 || var.encryption_key_file != ""
      error_message = "encryption_previous_key_files needs encryption_key_file: the earlier keys are read beside the current one."
    }
    precondition {
      condition     = length(var.consul.servers) == 0 || (var.coordination.kind == "consul" && var.consul_token_file != "")
      error_message = "consul.servers is set: use coordination kind consul and give the nodes' token in consul_token_file."
    }
  }

  provisioner "local-exec" {
    working_dir = local.ansible_dir
    interpreter = ["/bin/sh", "-c"]
    command     = "${local.run_playbook} site.yml"
    environment = {
      INVENTORY      = local.inventory
      PLAYBOOK       = var.ansible_playbook
      ANSIBLE_CONFIG = "${local.ansible_dir}/ansible.cfg"
    }
  }

  depends_on = [terraform_data.node]
}
