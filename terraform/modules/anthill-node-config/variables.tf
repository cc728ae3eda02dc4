variable "members" {
  description = "Every member: its name, the address the others reach it at, its Raft id (unique, above 0, never reused)."
  type = list(object({
    name    = string
    address = string
    raft_id = number
  }))
  validation {
    condition     = length(var.members) >= 1 && length(distinct([for m in var.members : m.name])) == length(var.members) && length(distinct([for m in var.members : m.raft_id])) == length(var.members)
    error_message = "members: at least one, every name and every raft_id unique."
  }
  validation {
    condition     = alltrue([for m in var.members : m.raft_id >= 1 && floor(m.raft_id) == m.raft_id])
    error_message = "members: raft_id must be a whole number above 0."
  }
}

variable "founders" {
  description = "The members that found the cluster (empty: all of them); any other joins."
  type        = list(string)
  default     = []
}

variable "partitions" {
  description = "How the event log is split; fixed once the cluster exists."
  type        = number
  default     = 16
}

variable "replication_factor" {
  description = "Nodes holding each partition (at most the number of members)."
  type        = number
  default     = 3
}

variable "coordination" {
  description = "`embedded`, or `consul` with the agent's address and the key prefix (the token is read from /etc/anthill/consul-token)."
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

variable "session_ttl_ms" {
  description = "The nodes' lease time; default 1000 (embedded) or 10000 (Consul's minimum)."
  type        = number
  default     = null
}

variable "config_overrides" {
  description = "Merged over every node's configuration (top-level keys replace)."
  type        = any
  default     = {}
}

variable "consul_token" {
  description = "The nodes' Consul ACL token (coordination `consul`), for the cloud-init user data."
  type        = string
  default     = ""
  sensitive   = true
}

variable "tls" {
  description = <<-EOT
    TLS (docs/security.md, docs/clouds.md "TLS"): `dir`, on the machine running Terraform, holds
    the cluster CA `ca.crt` and each member's `<name>.crt` and `<name>.key`, made before the
    apply (`anthill certs`); the user data writes them to /etc/anthill/tls/ and the
    configuration names them. Empty: no TLS. Peers check a node's certificate against its
    member name, so it need not name an address. `server_name`: the name clients check every
    node's certificate against (`--tls-server-name`), which each certificate must carry as
    well; only for the message that says how to make missing files.
  EOT
  type = object({
    dir         = optional(string, "")
    server_name = optional(string, "")
  })
  default = {}
}
