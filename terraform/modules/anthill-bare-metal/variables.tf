variable "hosts" {
  description = <<-EOT
    The servers, one Anthill node each. `name` is the node's member name, `address` where the
    others, the clients and Terraform reach it (SSH), `raft_id` its id in the cluster: unique,
    above 0, never reused (a host that comes back after being removed gets a new one). `zone`
    and `labels` are recorded in the inventory for placement-aware operations.
  EOT
  type = list(object({
    name     = string
    address  = string
    raft_id  = number
    ssh_user = optional(string, "root")
    zone     = optional(string, "")
    labels   = optional(map(string), {})
  }))
  validation {
    condition     = length(var.hosts) >= 1 && length(var.hosts) <= 12
    error_message = "hosts: 1 to 12 servers."
  }
  validation {
    condition     = length(distinct([for h in var.hosts : h.name])) == length(var.hosts) && length(distinct([for h in var.hosts : h.raft_id])) == length(var.hosts)
    error_message = "hosts: every name and every raft_id must be unique."
  }
  validation {
    condition     = alltrue([for h in var.hosts : can(regex("^[a-z0-9][a-z0-9.-]{0,62}$", h.name))])
    error_message = "hosts: a name is lower-case letters, digits, dots and dashes (a host name)."
  }
  validation {
    condition     = alltrue([for h in var.hosts : h.raft_id >= 1 && floor(h.raft_id) == h.raft_id])
    error_message = "hosts: raft_id must be a whole number above 0."
  }
}

variable "ssh_private_key_file" {
  description = "The private key Ansible logs in to the hosts with."
  type        = string
}

variable "ssh_extra_args" {
  description = "More `ssh` options for Ansible (e.g. `-o UserKnownHostsFile=…`)."
  type        = string
  default     = ""
}

variable "anthill_binary" {
  description = "The `anthill` binary installed on the hosts: a file on the machine running Terraform. Set this or `release_url`."
  type        = string
  default     = ""
}

variable "release_url" {
  description = "Where the hosts download the `anthill` binary from, with `release_sha256`. Set this or `anthill_binary`."
  type        = string
  default     = ""
}

variable "release_sha256" {
  description = "The SHA-256 of the binary at `release_url`."
  type        = string
  default     = ""
}

variable "anthill_version" {
  description = "The version installed (each has its own folder on the hosts). A new one rolls the nodes one at a time, drained first."
  type        = string
}

variable "partitions" {
  description = "How the event log is split; fixed once the cluster exists."
  type        = number
  default     = 16
}

variable "replication_factor" {
  description = "Nodes holding each partition (at most the number of hosts)."
  type        = number
  default     = 3
}

variable "coordination" {
  description = <<-EOT
    Where partition ownership is decided: `embedded` (the nodes' own Raft group, nothing else
    to run) or `consul` (`consul_address`, `consul_key_prefix` and the nodes' `consul_token`).
  EOT
  type = object({
    kind              = optional(string, "embedded")
    consul_address    = optional(string, "http://127.0.0.1:8500")
    consul_key_prefix = optional(string, "anthill/")
  })
  default = {}
  validation {
    condition     = contains(["embedded", "consul"], var.coordination.kind)
    error_message = "coordination.kind: embedded or consul."
  }
}

variable "consul_token_file" {
  description = "A file holding the nodes' Consul ACL token (with coordination `consul`), on the machine running Terraform; copied to each host, never logged nor kept in the state."
  type        = string
  default     = ""
}

variable "consul" {
  description = <<-EOT
    Consul run by this module for coordination `consul` (leave `servers` empty to use a Consul
    of your own at `coordination.consul_address`). `servers` names the hosts (of `hosts`) that
    run its servers: 1, 3 or 5, never removed by an apply (move a server first). Every other
    host runs a client agent; the nodes reach Consul through their own host's agent
    (`coordination.consul_address` stays `http://127.0.0.1:8500`). ACLs are on with a default
    deny: `management_token_file` holds the initial management token (a UUID), with which the
    playbook makes the agents' token and the nodes' token (`consul_token_file`, a UUID too).
    `binary` is the `consul` program on the machine running Terraform; `encrypt_key_file`, if
    set, the gossip key (`consul keygen`).
  EOT
  type = object({
    servers               = optional(list(string), [])
    binary                = optional(string, "")
    version               = optional(string, "1.20.2")
    datacenter            = optional(string, "dc1")
    management_token_file = optional(string, "")
    encrypt_key_file      = optional(string, "")
  })
  default = {}
  validation {
    condition     = contains([0, 1, 3, 5], length(var.consul.servers))
    error_message = "consul.servers: none (a Consul of your own), or 1, 3 or 5 hosts."
  }
  validation {
    condition     = length(var.consul.servers) == 0 || (var.consul.binary != "" && var.consul.management_token_file != "")
    error_message = "consul: with servers, set binary and management_token_file."
  }
}

variable "tls" {
  description = <<-EOT
    TLS between clients and nodes and among the nodes (docs/security.md), on by default.
    `dir`, on the machine running Terraform, holds the cluster CA `ca.crt`, each host's
    `<name>.crt` and `<name>.key`, and the administrator's client certificate `admin.crt` and
    `admin.key` (what the playbooks' own commands use); empty: `anthill-tls` beside the root
    module. With `generate`, the playbook makes the missing ones with `anthill certs` (a
    development CA: put your own CA's files there first for production). Keep the folder out
    of version control. Fixed at creation: nodes with and without TLS cannot talk.
    When the folder holds the CA's key, every converge renews the certificates ending within
    `renew_within_days` (`anthill certs renew`); the nodes reload them without a restart, so
    `terraform apply -replace=module.anthill.terraform_data.converge` more often than that
    keeps them valid.
  EOT
  type = object({
    enabled           = optional(bool, true)
    dir               = optional(string, "")
    generate          = optional(bool, true)
    renew_within_days = optional(number, 30)
  })
  default = {}
}

variable "encryption_key_file" {
  description = "A file holding the key-encryption key (64 hex digits, `openssl rand -hex 32`) on the machine running Terraform; copied to each host readable by the service only. Empty: events are stored as sent (docs/security.md)."
  type        = string
  default     = ""
}

variable "encryption_previous_key_files" {
  description = "Earlier key-encryption keys still read while `anthill tenant rewrap-keys` moves the tenants' data keys to `encryption_key_file` (a rotation: the new key in `encryption_key_file`, the old one here, apply, rewrap, then drop it from here and apply). Dropping a key the data keys still need makes those tenants unreadable until it is back."
  type        = list(string)
  default     = []
}

variable "config_overrides" {
  description = "Merged over each node's configuration (docs/configuration.md)."
  type        = any
  default     = {}
}

variable "ansible_playbook" {
  description = "The `ansible-playbook` program Terraform runs."
  type        = string
  default     = "ansible-playbook"
}

variable "ansible_dir" {
  description = "The folder of the playbooks (this repository's `ansible/`)."
  type        = string
  default     = ""
}
