"""Built-in demo upstreams (a CRM and a VoIP API) that `fairgate demo` sits in front of."""
