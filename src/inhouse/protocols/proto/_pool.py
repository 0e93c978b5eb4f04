"""inhouse's own protobuf descriptor pool. The KServe v2 messages live here rather than in
protobuf's default pool so that inhouse and tritonclient (which defines the same
``inference.*`` symbols) can be imported in one process."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
