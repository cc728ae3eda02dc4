output "yaml" {
  description = "Each member's configuration, by name, as YAML."
  value       = { for name, config in local.configs : name => yamlencode(config) }
}

output "cloud_init" {
  description = "Each member's cloud-init user data, by name: its configuration (and the Consul token) written at first boot, then its node started (the image's unit waits for the configuration)."
  sensitive   = true
  value = { for name, config in local.configs : name => templatefile("${path.module}/cloud-init.yaml.tftpl", {
    node_yaml    = yamlencode(config)
    consul_token = var.consul_token
    tls_files    = local.tls_contents[name]
  }) }
  precondition {
    condition     = length(local.tls_missing) == 0
    error_message = local.tls_missing_message
  }
  precondition {
    condition     = !contains([for m in var.members : m.name], var.tls.server_name)
    error_message = "tls.server_name ${var.tls.server_name} is a member's name: every node's certificate carries it, so any node could pass for that member to its peers. Pick another name."
  }
}

output "tls_files" {
  description = "Each member's TLS files, by name: a list of `{path, content}` to write on the machine (empty without TLS), for modules that write their own first-boot script."
  sensitive   = true
  value       = local.tls_contents
  precondition {
    condition     = length(local.tls_missing) == 0
    error_message = local.tls_missing_message
  }
}

output "status_command" {
  description = "The command that shows the cluster's members, partitions and leaders, from where the first member's address is reached (with TLS: as the administrator, with the files of `tls.dir`, checking `tls.server_name`)."
  value = (local.tls_on
    ? "anthill --tls-ca ${var.tls.dir}/ca.crt --tls-cert ${var.tls.dir}/admin.crt --tls-key ${var.tls.dir}/admin.key${var.tls.server_name != "" ? " --tls-server-name ${var.tls.server_name}" : ""} status --server https://${var.members[0].address}:7400"
    : "anthill status --server http://${var.members[0].address}:7400"
  )
}
