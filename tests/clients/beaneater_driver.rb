# Drives beaneater (Debian ruby-beaneater) through the operations named on the command line,
# each on a fresh connection, and prints one JSON line per operation (see libdrivers.py):
#   ruby beaneater_driver.rb PORT OP[:ARG]...
require 'beaneater'
require 'json'

class NotAvailable < StandardError; end

def short(v)
  text = case v
         when Beaneater::Job then "Job(id=#{v.id.inspect})"
         when Beaneater::StatStruct then 'StatStruct'
         else v.inspect
         end
  text.length > 60 ? "#{text[0, 57]}..." : text
end

def job_record(b, id)
  # What a job from reserve looks like to beaneater, so release/bury/touch send their command.
  Beaneater::Job.new(b, { status: 'RESERVED', id: id.to_s })
end

def op(b, name, arg)
  tube = arg || 'jobs'
  id = arg && arg.match?(/\A\d+\z/) ? arg.to_i : 1
  used = arg || 'default'
  case name
  when 'use' then b.tubes.use(tube)
  when 'watch' then b.tubes.watch(tube)
  when 'ignore' then b.tubes.ignore(arg || 'default')
  when 'put' then b.tubes[used].put('x')
  when 'reserve', 'reserve-with-timeout'
    b.tubes.watch!(arg) if arg
    name == 'reserve' ? b.tubes.reserve : b.tubes.reserve(0)
  when 'delete' then job_record(b, id).delete
  when 'release' then job_record(b, id).release(pri: 0, delay: 0)
  when 'bury' then job_record(b, id).bury(pri: 0)
  when 'touch' then job_record(b, id).touch
  when 'kick' then b.tubes[used].kick(1)
  when 'kick-job' then job_record(b, id).kick
  when 'peek' then b.jobs.find(id)
  when 'peek-ready' then b.tubes[used].peek(:ready)
  when 'peek-buried' then b.tubes[used].peek(:buried)
  when 'stats-job' then job_record(b, id).stats
  when 'stats-tube' then b.tubes[tube].stats
  when 'pause-tube' then b.tubes[tube].pause(0)
  when 'peek-delayed' then b.tubes[used].peek(:delayed)
  when 'list-tubes' then b.tubes.all
  when 'reserve-job' then raise NotAvailable, name
  else raise ArgumentError, "unknown op #{name}"
  end
end

port = ARGV[0]
ARGV[1..].each do |token|
  name, arg = token.split(':', 2)
  b = Beaneater.new("127.0.0.1:#{port}")
  begin
    value = op(b, name, arg)
    outcome = 'returned'
    detail = short(value)
  rescue NotAvailable
    puts JSON.generate({ op: token, outcome: 'n/a', detail: 'no such call', sync: '' })
    $stdout.flush
    b.close
    next
  rescue StandardError => e
    outcome = e.class.name.start_with?('Beaneater::') ? 'raised' : 'crashed'
    detail = "#{e.class.name}: #{e.message[0, 50]}"
  end
  begin
    s = b.connection.transmit('stats')[:body]  # one command (Beaneater#stats sends one per field)
    sync = "stats pid=#{s['pid']} uptime=#{s['uptime']}"
  rescue StandardError => e
    sync = "stats failed: #{e.class.name}: #{e.message[0, 40]}"
  end
  puts JSON.generate({ op: token, outcome: outcome, detail: detail, sync: sync })
  $stdout.flush
  b.close
end
