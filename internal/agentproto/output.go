package agentproto

import (
	"google.golang.org/protobuf/encoding/protowire"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// MaxOutputPrefix bounds what AppendOutputPrefix adds for a chunk of at
// most ChunkSize bytes.
const MaxOutputPrefix = 16

// Field numbers of ExecEvent.output, Output.fd and Output.data, read from
// the generated descriptors so they cannot drift from agent.proto.
var (
	fieldEventOutput = (&agentpb.ExecEvent{}).ProtoReflect().Descriptor().Fields().ByName("output").Number()
	fieldOutputFd    = (&agentpb.Output{}).ProtoReflect().Descriptor().Fields().ByName("fd").Number()
	fieldOutputData  = (&agentpb.Output{}).ProtoReflect().Descriptor().Fields().ByName("data").Number()
)

// AppendOutputPrefix appends the bytes that, followed by n bytes of data,
// form a framed ExecEvent{output: {fd, data}} exactly as Write would send
// it. It lets the agent read a pipe straight into the buffer that goes out,
// with the message header written in front afterwards, instead of copying
// every chunk through a marshaller.
func AppendOutputPrefix(b []byte, fd agentpb.Output_Fd, n int) []byte {
	inner := protowire.SizeTag(fieldOutputFd) + protowire.SizeVarint(uint64(fd)) +
		protowire.SizeTag(fieldOutputData) + protowire.SizeBytes(n)
	outer := protowire.SizeTag(fieldEventOutput) + protowire.SizeBytes(inner)
	b = protowire.AppendVarint(b, uint64(outer))
	b = protowire.AppendTag(b, fieldEventOutput, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(inner))
	b = protowire.AppendTag(b, fieldOutputFd, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(fd))
	b = protowire.AppendTag(b, fieldOutputData, protowire.BytesType)
	return protowire.AppendVarint(b, uint64(n))
}
