# Each node's configuration (`anthill node --config`'s YAML, docs/configuration.md) for a cluster
# whose members are known before the machines boot, and the cloud-init user data that writes
# it: what the cloud modules give their instances. The same settings as the anthill role's template
# (ansible/roles/anthill/templates/node.yaml.j2); Terraform's own functions only, no provider.

locals {
  # The token file only when a token is given (the node refuses a token file it cannot read).
  has_token = nonsensitive(var.consul_token != "")
  coordination = var.coordination.kind == "consul" ? merge({
    kind       = "consul"
    address    = var.coordination.consul_address
    key_prefix = var.coordination.consul_key_prefix
    }, local.has_token ? { token_file = "/etc/anthill/consul-token" } : {}) : {
    kind = "embedded"
  }
  session_ttl_ms = var.session_ttl_ms != null ? var.session_ttl_ms : (var.coordination.kind == "consul" ? 10000 : 1000)

  # TLS: the files each member's user data writes (from `tls.dir`), and the settings naming them.
  tls_on = var.tls.dir != ""
  tls_files = {
    for m in var.members : m.name => [
      for f in [["ca.crt", "ca.crt"], ["${m.name}.crt", "node.crt"], ["${m.name}.key", "node.key"]] : {
        source = "${var.tls.dir}/${f[0]}"
        path   = "/etc/anthill/tls/${f[1]}"
      }
    ] if local.tls_on
  }
  # The administrator's client certificate is not written to the machines, but the modules'
  # status_command uses it.
  tls_required = local.tls_on ? concat(
    flatten([for files in values(local.tls_files) : [for f in files : f.source]]),
    ["${var.tls.dir}/admin.crt", "${var.tls.dir}/admin.key"],
  ) : []
  tls_missing = distinct([for f in local.tls_required : f if !fileexists(f)])
  tls_contents = {
    for m in var.members : m.name => [
      for f in lookup(local.tls_files, m.name, []) : { path = f.path, content = fileexists(f.source) ? file(f.source) : "" }
    ]
  }
  # What to run when files are missing (docs/clouds.md "TLS").
  tls_host = var.tls.server_name != "" ? " --host ${var.tls.server_name}" : ""
  tls_missing_message = join("", [
    "tls.dir lacks ${join(", ", local.tls_missing)}: make the missing ones before the apply (docs/clouds.md \"TLS\"), with: ",
    "anthill certs ca --dir ${var.tls.dir}; ",
    join("", [for m in var.members : "anthill certs node ${m.name}${local.tls_host} --dir ${var.tls.dir}; "]),
    "anthill certs client admin --dir ${var.tls.dir}",
  ])
  tls_settings = local.tls_on ? {
    tls = { cert_file = "/etc/anthill/tls/node.crt", key_file = "/etc/anthill/tls/node.key", ca_file = "/etc/anthill/tls/ca.crt" }
  } : {}

  base = {
    for m in var.members : m.name => merge(local.tls_settings, {
      node_id      = m.name
      data_dir     = "/var/lib/anthill"
      listen_addr  = "0.0.0.0:7400"
      metrics_addr = "0.0.0.0:7401"
      storage      = { partitions = var.partitions }
      cluster = {
        members            = [for o in var.members : { id = o.raft_id, name = o.name, address = "${o.address}:7400" }]
        founders           = var.founders
        join               = !contains(var.founders, m.name) && length(var.founders) > 0
        replication_factor = var.replication_factor
        session_ttl_ms     = local.session_ttl_ms
        drain_on_stop_ms   = 10000
        coordination       = local.coordination
      }
      telemetry = { log_level = "info" }
    })
  }
  # `config_overrides` merged two levels deep, as the role's `combine(recursive=True)` does for
  # the settings there are: a top-level key it names replaces the base's unless both are
  # objects, which are merged key by key.
  configs = {
    for name, base in local.base : name => merge(base, var.config_overrides, {
      for key, value in var.config_overrides : key => merge(base[key], value)
      if contains(keys(base), key) && can(keys(value)) && can(keys(base[key]))
    })
  }
}
