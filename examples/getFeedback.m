function value = getFeedback(host, port, volIdx)
% GETFEEDBACK  mirage-rt's feedback value for one volume, from its results server.
%
%   value = getFeedback('127.0.0.1', 5556, 24)
%
% Sends the 0-based volume index as four digits (pyneal's results protocol, as
% getFromPyneal.m does), reads the one JSON line the server answers, and returns its
% "feedback" field: the [feedback] recipe's displayed value. Returns NaN while the volume is
% not yet processed or has no value (before a baseline block). Needs MATLAB R2019b or later
% (tcpclient with readline).
c = tcpclient(host, port, 'Timeout', 2);
cleanup = onCleanup(@() clear('c'));
write(c, uint8(sprintf('%04d', volIdx)));
reply = jsondecode(char(readline(c)));
value = NaN;
if isfield(reply, 'foundResults') && reply.foundResults && isfield(reply, 'feedback') ...
        && ~isempty(reply.feedback)
    value = reply.feedback;
end
end
