variable "hosts" {
  description = "The dozen servers (terraform.tfvars lists the bare-metal lab's: tests/e2e/lab/metal.sh up --hosts 12)."
  type = list(object({
    name    = string
    address = string
    raft_id = number
    zone    = optional(string, "")
  }))
}

variable "ssh_private_key_file" {
  description = "The key root logs in to the hosts with (the lab's: /tmp/anthill-metallab/id_ed25519)."
  type        = string
  default     = "/tmp/anthill-metallab/id_ed25519"
}

variable "ssh_extra_args" {
  description = "More `ssh` options (the lab keeps its hosts' keys in its own known_hosts)."
  type        = string
  default     = "-o UserKnownHostsFile=/tmp/anthill-metallab/known_hosts -o StrictHostKeyChecking=accept-new"
}

variable "anthill_binary" {
  description = "The `anthill` binary to install (`cargo build --release` makes target/release/anthill)."
  type        = string
}

variable "anthill_version" {
  description = "Its version; a new one rolls the nodes."
  type        = string
  default     = "0.1.0"
}

variable "coordination" {
  description = "`embedded` (default) or `consul` with its address."
  type = object({
    kind              = optional(string, "embedded")
    consul_address    = optional(string, "http://127.0.0.1:8500")
    consul_key_prefix = optional(string, "anthill/")
  })
  default = {}
}

variable "consul_token_file" {
  description = "The nodes' Consul token, in a file (with coordination `consul`)."
  type        = string
  default     = ""
}

variable "consul" {
  description = "Consul run on some of the hosts (servers, the management token's file, the `consul` binary): see the module's variable."
  type = object({
    servers               = optional(list(string), [])
    binary                = optional(string, "")
    version               = optional(string, "1.20.2")
    management_token_file = optional(string, "")
    encrypt_key_file      = optional(string, "")
  })
  default = {}
}

variable "ansible_playbook" {
  description = "The `ansible-playbook` to run (the project's: .tools/bin/ansible-playbook)."
  type        = string
  default     = "ansible-playbook"
}

variable "tls" {
  description = "TLS, on by default, its files in `dir` (empty: `anthill-tls` here), the missing ones made with `anthill certs` when `generate`, those ending within `renew_within_days` renewed at every converge: see the module's variable."
  type = object({
    enabled           = optional(bool, true)
    dir               = optional(string, "")
    generate          = optional(bool, true)
    renew_within_days = optional(number, 30)
  })
  default = {}
}

variable "encryption_key_file" {
  description = "The key-encryption key's file (64 hex digits); empty: no encryption at rest. See the module's variable."
  type        = string
  default     = ""
}
