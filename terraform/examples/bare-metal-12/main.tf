# Twelve servers, one Anthill cluster: 16 partitions, each on 3 of them (docs/bare-metal.md).
module "anthill" {
  source = "../../modules/anthill-bare-metal"

  hosts                = var.hosts
  ssh_private_key_file = var.ssh_private_key_file
  ssh_extra_args       = var.ssh_extra_args
  anthill_binary       = var.anthill_binary
  anthill_version      = var.anthill_version
  partitions           = 16
  replication_factor   = 3
  coordination         = var.coordination
  consul_token_file    = var.consul_token_file
  consul               = var.consul
  tls                  = var.tls
  encryption_key_file  = var.encryption_key_file
  ansible_playbook     = var.ansible_playbook
}

output "client_endpoints" {
  value = module.anthill.client_endpoints
}

output "status_command" {
  value = module.anthill.status_command
}
