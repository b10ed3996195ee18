// @tus/server with @tus/file-store, set up as their READMEs show: the reference target of run.py.
// Usage: node server.mjs PORT DIRECTORY (or TUS_PORT and TUS_DIR); listens on 127.0.0.1, path /files/.
// SIGTERM (node's default action) stops it.
import { FileStore } from '@tus/file-store'
import { Server } from '@tus/server'

const port = Number(process.argv[2] ?? process.env.TUS_PORT)
const directory = process.argv[3] ?? process.env.TUS_DIR
if (!Number.isInteger(port) || !directory) {
  console.error('usage: node server.mjs PORT DIRECTORY')
  process.exit(2)
}

const server = new Server({ path: '/files', datastore: new FileStore({ directory }) })
server.listen({ host: '127.0.0.1', port }, () => {
  console.log(`@tus/server listening on http://127.0.0.1:${port}/files/`)
})
