"""gRPC metadata keys of the contract (beside the messages of spinn_v1.proto)."""

#: Trailing metadata of a refusal for a model digest the cloud does not serve: ``label=digest,label=digest`` of
#: every version it serves, oldest first, so that a device can tell version skew from other refusals and say
#: what the cloud serves.
SERVED_VERSIONS_KEY = "spinn-served-versions"
